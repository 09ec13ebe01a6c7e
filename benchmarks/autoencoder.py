"""Benchmark: LocoProp (lwcompile) against tuned backprop on the paper's deep autoencoder, in one run.

Every run starts from the same init (``--seed``) and sees the same batches in the same order. Methods:
LocoProp-M (md_post + matching), LocoProp-S (gd_pre + squared_pre), gd_post + squared_post and
dual_md_pre + dual_bregman, all with the paper's inner recipe (γ = 10, T = 10, TF1 RMSProp with momentum
0.999, decay 0.9, ε = 1e-5, inner lr 1e-5 decayed by max(1 − k/T, 0.25) inside a step, no proximal term);
backprop with SGD+momentum, Adam and RMSProp, each over a small learning-rate grid (the best run of each by
train loss is reported). Reported:

* train loss (whole training set, the official code's measure) and test loss after ``--steps`` steps;
* the loss reached at equal wall-clock: with t = ``--steps`` × LocoProp-M's median step time, every faster
  method (best lr only for backprop) keeps training to t / (its own median step time) steps, then is evaluated
  (medians, not summed times, so that a burst of load from other processes does not move the budget);
* the median step time of each method and its ratio to Adam's;
* for lwcompile, the inner phase's achieved GFLOP/s (Σ block.inner_flops / last_timings['inner'], median over
  steps) against the float32 matmul rate measured on the same machine in the same run.

Writes ``results.md`` (Markdown tables), ``results.json`` and ``curves.png`` to ``--out``.

    python benchmarks/autoencoder.py                      # full MNIST, 60 steps (one epoch) per run: ~15-20 min on 2 idle cores
    python benchmarks/autoencoder.py --quick              # digits, 30 steps: < 2 min
    python benchmarks/autoencoder.py --steps 300 --methods locoprop-m   # the paper's 5 epochs, LocoProp-M only

Short runs cannot use the official per-epoch warm-up (its epoch 0 runs at lr 0), so the LocoProp inner lr
warms up linearly per step over ``--warmup-steps`` (default: a fifth of ``--steps``) and is then constant.
Backprop runs use a constant lr (tuned over the grid).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lwcompile  # noqa: E402
from backprop_baselines import DIGITS_SIZES, LR_GRID, full_loss  # noqa: E402
from bench_setup import data_source, setup_torch, write_results  # noqa: E402
from lwcompile.experiments.data import batches, load_images  # noqa: E402
from lwcompile.experiments.models import (AUTOENCODER_SIZES, backprop_optimizer, bce_sum,  # noqa: E402
                                          deep_autoencoder, outputs_to_logits, sigmoid_xent_sum)

LOCOPROP = {
    "locoprop-m": ("md_post", "matching"),
    "locoprop-s": ("gd_pre", "squared_pre"),
    "gdpost-squared": ("gd_post", "squared_post"),
    "dualmd-bregman": ("dual_md_pre", "dual_bregman"),
}
BACKPROP = ("sgd", "adam", "rmsprop")
QUICK_GRID = {"sgd": (1e-3,), "adam": (3e-3,), "rmsprop": (1e-3,)}


def matmul_gflops(n: int = 1000, k: int = 1000, m: int = 784, reps: int = 10) -> float:
    """Measured float32 matmul rate (GFLOP/s) of this process's threads on (n×k)@(k×m), best of 3 rounds.

    >>> matmul_gflops(64, 64, 64, reps=2) > 0
    True
    """
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, k, generator=g), torch.randn(k, m, generator=g)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n * k * m * reps / best / 1e9


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if s else float("nan")


class Run:
    """One method on one model; resumable: ``train(n_steps)`` continues where it stopped."""

    def __init__(self, name: str, kind: str, sizes: Sequence[int], x_train: torch.Tensor, batch_size: int,
                 seed: int, lr: float | None = None, target: str | None = None, local: str | None = None,
                 inner_lr: float = 1e-5, warmup_steps: int = 0, output_sigmoid: bool = True) -> None:
        self.name, self.kind, self.lr = name, kind, lr
        self.x_train, self.batch_size, self.seed = x_train, batch_size, seed
        self.program: lwcompile.Program | None = None
        self.inner_lr, self.warmup_steps = inner_lr, warmup_steps
        if kind == "lwcompile":
            self.model = deep_autoencoder(sizes, seed=seed, output_sigmoid=output_sigmoid)
            cfg = lwcompile.Config(target=target, local_loss=local, gamma=10.0, steps=10,
                                   inner_optimizer="rmsprop_tf1", inner_lr=inner_lr, momentum=0.999, decay=0.9,
                                   eps=1e-5, inner_lr_decay=True, prox=0.0)
            self.program = lwcompile.transform(self.model, bce_sum if output_sigmoid else sigmoid_xent_sum,
                                               (x_train[:batch_size],), cfg)
            self.inner_flops = sum(b.inner_flops(cfg.steps, batch_size) for b in self.program.blocks)
        else:
            self.model = deep_autoencoder(sizes, seed=seed)
            self.opt = backprop_optimizer(kind, self.model.parameters(), lr)
        self.logits = outputs_to_logits(self.model)
        self.steps = 0
        self.wall = 0.0  # seconds spent in step() only
        self.batch_losses: list[float] = []
        self.cum_time: list[float] = []
        self.step_times: list[float] = []
        self.inner_gflops: list[float] = []
        self.timings: list[dict[str, float]] = []
        self.diverged = False
        self._batches = self._stream()

    def _stream(self) -> Iterator[torch.Tensor]:
        epoch = 0
        while True:
            yield from batches(self.x_train, self.batch_size, epoch=epoch, seed=self.seed)
            epoch += 1

    def _step(self, xb: torch.Tensor) -> float:
        if self.program is not None:
            w = self.warmup_steps
            self.program.inner_lr = self.inner_lr * (min(1.0, (self.steps + 1) / w) if w > 0 else 1.0)
            return self.program.step(xb, xb)
        self.opt.zero_grad(set_to_none=True)
        loss = sigmoid_xent_sum(self.model(xb), xb)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def train(self, n_steps: int, bar: Any = None) -> None:
        """Train until ``n_steps`` steps in all (or a non-finite loss)."""
        while not self.diverged and self.steps < n_steps:
            xb = next(self._batches)
            t0 = time.perf_counter()
            try:
                loss = self._step(xb)
            except lwcompile.NonFiniteError:
                loss = float("nan")
            dt = time.perf_counter() - t0
            self.steps += 1
            self.wall += dt
            self.step_times.append(dt)
            self.cum_time.append(self.wall)
            self.batch_losses.append(loss)
            if self.program is not None and self.program.last_timings:
                self.timings.append(dict(self.program.last_timings))
                self.inner_gflops.append(self.inner_flops / self.program.last_timings["inner"] / 1e9)
            if not math.isfinite(loss):
                self.diverged = True
            if bar is not None:
                bar.update(1)
                bar.set_postfix(run=self.name, loss=f"{loss:.2f}")

    def evaluate(self, x_train: torch.Tensor, x_test: torch.Tensor) -> dict[str, float]:
        if self.diverged:
            return {"train": float("nan"), "test": float("nan"), "steps": self.steps, "wall_s": self.wall}
        return {"train": full_loss(self.logits, x_train), "test": full_loss(self.logits, x_test),
                "steps": self.steps, "wall_s": self.wall}

    def record(self) -> dict[str, Any]:
        out = {"name": self.name, "kind": self.kind, "lr": self.lr, "steps": self.steps, "wall_s": self.wall,
               "diverged": self.diverged, "batch_losses": self.batch_losses, "cum_time": self.cum_time,
               "median_step_s": _median(self.step_times[1:] or self.step_times)}
        if self.program is not None:
            out["inner_lr"] = self.inner_lr
            out["warmup_steps"] = self.warmup_steps
            out["inner_flops_per_step"] = self.inner_flops
            out["median_inner_gflops"] = _median(self.inner_gflops[1:] or self.inner_gflops)
            for key in ("target", "inner", "update", "total"):
                out[f"median_{key}_s"] = _median([t[key] for t in self.timings[1:] or self.timings])
        return out


def run_benchmark(x_train: torch.Tensor, x_test: torch.Tensor, sizes: Sequence[int], batch_size: int, steps: int,
                  grid: dict[str, Sequence[float]], methods: Sequence[str], seed: int = 0, warmup_steps: int = 0,
                  inner_lr: float = 1e-5, equal_time: bool = True, output_sigmoid: bool = True,
                  progress: bool = True) -> dict[str, Any]:
    """Run everything; return a JSON-friendly dict (see ``format_markdown`` for what is reported)."""
    from tqdm import tqdm

    t_start = time.perf_counter()
    res: dict[str, Any] = {"steps": steps, "batch_size": batch_size, "sizes": list(sizes), "seed": seed,
                           "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                           "torch": torch.__version__, "matmul_gflops": [matmul_gflops()]}
    init_model = deep_autoencoder(sizes, seed=seed).double()
    first = next(batches(x_train, batch_size, epoch=0, seed=seed))
    with torch.no_grad():
        res["init_loss_first_batch_float64"] = float(sigmoid_xent_sum(init_model(first.double()), first.double()))
        res["init_train_loss"] = full_loss(init_model, x_train.double())
        res["init_test_loss"] = full_loss(init_model, x_test.double())
    del init_model
    n_grid = sum(len(v) for v in grid.values())
    bar = tqdm(total=steps * (len(methods) + n_grid), desc="benchmark", unit="step", disable=not progress,
               dynamic_ncols=True)
    runs: dict[str, Run] = {}
    lw_results: list[dict[str, Any]] = []
    t_eq = None

    def equal_time_steps(r: Run) -> int:
        """Steps this run makes in t_eq seconds at its own median step time (capped at 50 × steps)."""
        return min(math.ceil(t_eq / r.record()["median_step_s"]), 50 * steps)

    order = sorted(methods, key=lambda m: m != "locoprop-m")  # LocoProp-M first: it sets the time budget
    for name in order:
        target, local = LOCOPROP[name]
        r = Run(name, "lwcompile", sizes, x_train, batch_size, seed, target=target, local=local,
                inner_lr=inner_lr, warmup_steps=warmup_steps, output_sigmoid=output_sigmoid)
        r.train(n_steps=steps, bar=bar)
        at_steps = r.evaluate(x_train, x_test)
        if t_eq is None and equal_time:
            t_eq = steps * r.record()["median_step_s"]
        at_time = None
        if t_eq is not None:
            n_eq = equal_time_steps(r)
            if name == "locoprop-m":
                at_time = at_steps
            elif n_eq > steps:  # faster than LocoProp-M: keep going to the same time
                r.train(n_steps=n_eq)
                at_time = r.evaluate(x_train, x_test)
        rec = r.record() | {"at_steps": at_steps, "at_equal_time": at_time}
        lw_results.append(rec)
        runs[name] = r
    bp_results: list[dict[str, Any]] = []
    best: dict[str, dict[str, Any]] = {}
    for opt, lrs in grid.items():
        for lr in lrs:
            r = Run(f"{opt} lr={lr:g}", opt, sizes, x_train, batch_size, seed, lr=lr)
            r.train(n_steps=steps, bar=bar)
            rec = r.record() | {"at_steps": r.evaluate(x_train, x_test), "at_equal_time": None}
            bp_results.append(rec)
            score, cur = rec["at_steps"]["train"], best.get(opt)
            if cur is None or (math.isfinite(score) and not cur["at_steps"]["train"] <= score):  # nan never wins
                best[opt] = rec
                runs[f"best-{opt}"] = r
    bar.close()
    if t_eq is not None:  # give the best backprop runs the same wall-clock budget as LocoProp-M
        for opt, rec in best.items():
            r = runs[f"best-{opt}"]
            steps_before = r.steps
            r.train(n_steps=max(equal_time_steps(r), steps))
            rec["at_equal_time"] = r.evaluate(x_train, x_test)
            rec["equal_time_extra_steps"] = r.steps - steps_before
            rec["batch_losses"], rec["cum_time"] = r.batch_losses, r.cum_time
            rec["steps"], rec["wall_s"] = r.steps, r.wall
    res["matmul_gflops"].append(matmul_gflops())
    res["equal_time_s"] = t_eq
    res["locoprop"] = lw_results
    res["backprop"] = bp_results
    res["best_backprop"] = {k: v["name"] for k, v in best.items()}
    adam = best.get("adam")
    res["adam_median_step_s"] = adam["median_step_s"] if adam else None
    res["total_s"] = time.perf_counter() - t_start
    return res


def format_markdown(res: dict[str, Any]) -> str:
    adam = res.get("adam_median_step_s") or float("nan")
    best = set(res["best_backprop"].values())
    mm = res["matmul_gflops"]
    lines = [
        f"# Deep autoencoder: LocoProp (lwcompile) vs backprop",
        "",
        f"Data: {res['data']}, train {res['n_train']} / test {res['n_test']} images, net {'-'.join(map(str, res['sizes']))}, "
        f"batch {res['batch_size']}, seed {res['seed']}, {res['threads']} torch threads, torch {res['torch']}. "
        f"Same init and batch order for every run. Loss: sigmoid cross-entropy summed over pixels, mean over "
        f"examples; *train* = whole training set (the official code's measure), evaluated after the steps.",
        "",
        f"Init loss: train {res['init_train_loss']:.3f}, test {res['init_test_loss']:.3f} (float64).",
        "",
        f"## After {res['steps']} steps",
        "",
        "| method | lr | train | test | median step (s) | ratio to Adam | " + (
            f"train at {res['equal_time_s']:.0f} s | steps by then |" if res.get("equal_time_s") else " | |"),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def row(rec: dict[str, Any], lr: str) -> str:
        a, t = rec["at_steps"], rec.get("at_equal_time")
        eq = (f"{t['train']:.3f} | {t['steps']}" if t else "— | —")
        tag = " (best)" if rec["name"] in best else ""
        return (f"| {rec['name']}{tag} | {lr} | {a['train']:.3f} | {a['test']:.3f} | {rec['median_step_s']:.3f} | "
                f"{rec['median_step_s'] / adam:.2f} | {eq} |")

    for rec in res["locoprop"]:
        lines.append(row(rec, f"inner {rec['inner_lr']:g}"))
    for rec in res["backprop"]:
        lines.append(row(rec, f"{rec['lr']:g}"))
    lines += [
        "",
        "Equal wall-clock: t = steps × LocoProp-M's median step time; each faster method continued to "
        "t / (its median step time) steps (only the best lr of each backprop optimizer; a LocoProp variant slower "
        "than LocoProp-M shows —). The wall-clock axis of the plot is the measured time in `step`.",
        "",
        "## lwcompile inner phase",
        "",
        f"Measured float32 matmul rate (1000×1000 @ 1000×784, best of 3, at start / end): "
        f"{mm[0]:.1f} / {mm[-1]:.1f} GFLOP/s.",
        "",
        "| method | inner FLOP / step | median target (s) | median inner (s) | median update (s) | inner GFLOP/s | "
        "% of matmul rate |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rate = max(mm)
    for rec in res["locoprop"]:
        lines.append(f"| {rec['name']} | {rec['inner_flops_per_step'] / 1e9:.2f} G | {rec['median_target_s']:.3f} | "
                     f"{rec['median_inner_s']:.3f} | {rec['median_update_s']:.3f} | {rec['median_inner_gflops']:.1f} | "
                     f"{100 * rec['median_inner_gflops'] / rate:.0f}% |")
    lines += ["", f"Total benchmark time {res['total_s']:.0f} s.", ""]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    best = set(res["best_backprop"].values())
    shown = res["locoprop"] + [r for r in res["backprop"] if r["name"] in best]
    for rec in shown:
        ls = "-" if rec["kind"] == "lwcompile" else "--"
        y = rec["batch_losses"]
        a1.plot(range(1, len(y) + 1), y, ls, label=rec["name"])
        a2.plot(rec["cum_time"], y, ls, label=rec["name"])
    for ax, xl in ((a1, "step"), (a2, "wall-clock seconds in step()")):
        ax.set_xlabel(xl)
        ax.set_ylabel("batch train loss")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    if res.get("equal_time_s"):
        a1.axvline(res["steps"], color="grey", lw=0.8)
        a2.axvline(res["equal_time_s"], color="grey", lw=0.8)
    a1.legend(fontsize=8)
    a1.set_title(f"{res['data']}: loss per step")
    a2.set_title("loss per wall-clock second")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="auto",
                   help="MNIST idx directory; 'auto' = ../shared/data/mnist if present else sklearn digits; 'digits'")
    p.add_argument("--out", type=Path, default=Path("runs/benchmark-autoencoder"))
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 60 = one MNIST epoch; --quick 30)")
    p.add_argument("--batch-size", type=int, default=None, help="default 1000 (MNIST) / 100 (digits)")
    p.add_argument("--methods", default=",".join(LOCOPROP), help=f"LocoProp variants, comma-separated: {', '.join(LOCOPROP)}")
    p.add_argument("--warmup-steps", type=int, default=None, help="LocoProp inner-lr warm-up (default steps // 5)")
    p.add_argument("--inner-lr", type=float, default=1e-5)
    p.add_argument("--output-layer", choices=("sigmoid", "identity"), default="sigmoid")
    p.add_argument("--train-subset", type=int, default=0)
    p.add_argument("--no-equal-time", action="store_true", help="skip the equal wall-clock extension")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="digits, 30 steps, one lr per optimizer: < 2 minutes")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    setup_torch(a.threads)
    arg = data_source(a.data_dir, a.quick)
    x_train, name = load_images(arg, "train")
    x_test, _ = load_images(arg, "test")
    if a.train_subset:
        x_train = x_train[:a.train_subset]
    sizes = AUTOENCODER_SIZES if name == "mnist" else DIGITS_SIZES
    batch_size = a.batch_size or (1000 if name == "mnist" else 100)
    steps = a.steps or (30 if a.quick else 60)
    warmup = steps // 5 if a.warmup_steps is None else a.warmup_steps
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        if m not in LOCOPROP:
            p.error(f"unknown method {m!r}; choose from {', '.join(LOCOPROP)}")
    grid = QUICK_GRID if a.quick else LR_GRID
    print(f"data={name} train={tuple(x_train.shape)} test={tuple(x_test.shape)} sizes={sizes} batch={batch_size} "
          f"steps={steps} warmup={warmup} methods={methods} grid={grid} threads={torch.get_num_threads()}", flush=True)
    res = run_benchmark(x_train, x_test, sizes, batch_size, steps, grid, methods, seed=a.seed, warmup_steps=warmup,
                        inner_lr=a.inner_lr, equal_time=not a.no_equal_time,
                        output_sigmoid=a.output_layer == "sigmoid", progress=not a.no_progress)
    res |= {"data": name, "n_train": int(x_train.shape[0]), "n_test": int(x_test.shape[0]), "warmup_steps": warmup}
    write_results(a.out, res, format_markdown(res), plot, "curves.png")
    return res


if __name__ == "__main__":
    main()
