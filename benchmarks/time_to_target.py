"""Benchmark: wall-clock time to a train-loss target on the paper's MNIST deep autoencoder, every method in one run.

Every run starts from the same init (``--seed``) and sees the same batches in the same order. The clock counts only
training steps; the train loss is evaluated on a fixed subset (10,000 MNIST training images) outside the clock,
at clock times spaced by max(``--eval-every``, ``--eval-frac`` of the elapsed time; default 1 s, 1 %). Methods:

* ``adam``, ``rmsprop``: torch.optim backprop over a small lr grid. Every lr trains ``--grid-s`` seconds; the best
  (lowest eval loss) then keeps training: its reported curve is that one run, from step 0.
* ``peer``: the PyPI ``locoprop`` package (LocoProp-M, T = 10, its torch RMSprop defaults lr 2e-5, momentum 0.999,
  alpha 0.9, eps 1e-6, correction 0.1). Optional: ``pip install --no-deps locoprop`` (``--no-deps`` so that it can
  never pull another torch); its rows are skipped with a note when it is not installed.
* ``defaults``: lwcompile with ``Config()`` (LocoProp-M, T = 3, γ = 30, TF1 RMSProp, inner lr 1e-4).
* ``best``: lwcompile with the best recipe found (``RECIPES["best"]``: LocoProp-S with the exact inner solve).
* ``paper-M``: LocoProp-M with the paper's T = 10, γ = 10, inner lr 1e-5 (``RECIPES["paper-M"]``; no schedule),
  the settings the peer also uses: its step time against the peer's is the per-step cost comparison.
* ``defaults+compile``, ``paper-M+compile``: the same with ``compile_inner=True`` (the inner graphs compiled by
  ``torch.compile``; compiled off the clock). Not run unless named in ``--methods``.

``--method-budget defaults=60`` gives one method its own budget; ``--deadline-s`` skips, with a note, the methods
that would start after that many seconds of the whole benchmark.

Reported per method: steps and clocked seconds to each ``--targets`` loss (at the first evaluation at or below it),
median step time, the inner phase's achieved GFLOP/s (lwcompile: its inner FLOPs / measured inner time; backprop:
the whole step's 6·params·batch FLOPs / step time) against the float32 matmul rate measured in the same run,
and the goals' ratios. Writes ``results.md``, ``results.json`` and ``loss_vs_time.png`` to ``--out``.

    python benchmarks/time_to_target.py                 # MNIST (../shared/data/mnist), ~15 min on 2 idle cores
    python benchmarks/time_to_target.py --quick         # scikit-learn digits, < 1 min
    python benchmarks/time_to_target.py --methods adam,best --budget-s 60

Numbers are ratios within one run on one machine: the CPU is printed and recorded.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lwcompile  # noqa: E402
from autoencoder import matmul_gflops  # noqa: E402
from levers import LEVERS, format_levers, measure_levers  # noqa: E402
from bench_setup import load_autoencoder_data, setup_torch, write_results  # noqa: E402
from lwcompile.experiments.data import batches  # noqa: E402
from lwcompile.experiments.models import (backprop_optimizer, bce_sum,  # noqa: E402
                                          deep_autoencoder, full_loss, outputs_to_logits, sigmoid_xent_sum)
from lwcompile.runtime.costs import exact_flops  # noqa: E402

# The recipes the benchmark and the study compare (docs/performance.md says where "best" comes from).
RECIPES: dict[str, lwcompile.Config] = {
    "defaults": lwcompile.Config(),
    # LocoProp-M with the paper's T, γ and inner lr (the defaults before the study; no schedule)
    "paper-M": lwcompile.Config(steps=10, gamma=10.0, inner_lr=1e-5, momentum=0.999),
    # LocoProp-S with the exact inner solve; γ and λ from benchmarks/recipe_study.py (docs/performance.md)
    "best": lwcompile.Config(target="gd_pre", local_loss="squared_pre", inner_optimizer="exact", gamma=500.0,
                             prox=50.0),
}
# Opt-in rows (only when named in --methods): the inner graphs compiled by torch.compile, against the above.
OPTIONAL_RECIPES = {f"{name}+compile": RECIPES[name].replace(compile_inner=True) for name in ("defaults", "paper-M")}
GRID = {"adam": (1e-3, 3e-3), "rmsprop": (3e-4, 1e-3)}
QUICK_GRID = {"adam": (1e-3, 3e-3), "rmsprop": (1e-3,)}
METHODS = ("best", "adam", "peer", "defaults", "paper-M", "rmsprop")  # the default run
OPTIONAL_METHODS = tuple(OPTIONAL_RECIPES)
TARGETS = {"mnist": (100.0, 80.0, 70.0), "digits": (30.0, 27.0, 25.0)}


def cpu_name() -> str:
    """The CPU's model name and vector extensions, from /proc/cpuinfo (Linux) or platform."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags"))
        ext = [f for f in ("avx2", "avx512f", "fma") if f in flags]
        return f"{name} ({os.cpu_count()} logical cores; {', '.join(ext) or 'no AVX2'})"
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if s else float("nan")


class Run:
    """One method from one init; ``train`` resumes where it stopped, so a grid winner just keeps going."""

    def __init__(self, name: str, setting: str, step: Callable[[torch.Tensor], Any], logits: torch.nn.Module,
                 x_train: torch.Tensor, batch_size: int, seed: int, program: lwcompile.Program | None = None,
                 step_flops: float | None = None, inner_flops: float | None = None,
                 clock: Callable[[], float] = time.perf_counter, compile_s: float = 0.0) -> None:
        self.name, self.setting, self._step, self.logits = name, setting, step, logits
        self._clock, self.compile_s = clock, compile_s
        self.program, self.step_flops, self.inner_flops = program, step_flops, inner_flops
        self.x_train, self.batch_size, self.seed = x_train, batch_size, seed
        self.steps, self.clock, self.diverged = 0, 0.0, False
        self.step_times: list[float] = []
        self.inner_times: list[float] = []
        self.evals: list[tuple[int, float, float]] = []  # (steps, clocked seconds, eval loss)
        self._batches = self._stream()

    def _stream(self) -> Iterator[torch.Tensor]:
        epoch = 0
        while True:
            yield from batches(self.x_train, self.batch_size, epoch=epoch, seed=self.seed)
            epoch += 1

    def evaluate(self, x_eval: torch.Tensor) -> float:
        loss = float("nan") if self.diverged else full_loss(self.logits, x_eval)
        self.evals.append((self.steps, self.clock, loss))
        return loss

    def train(self, x_eval: torch.Tensor, until_s: float, stop_below: float, eval_every: float,
              eval_frac: float = 0.01) -> None:
        """Train until ``until_s`` clocked seconds, a non-finite loss, or an eval loss <= ``stop_below``."""
        if not self.evals:
            self.evaluate(x_eval)
        next_eval = self.clock + max(eval_every, eval_frac * self.clock)
        while not self.diverged and self.clock < until_s and not self.evals[-1][2] <= stop_below:
            xb = next(self._batches)
            t0 = self._clock()
            try:
                loss = float(self._step(xb))
            except lwcompile.NonFiniteError:
                loss = float("nan")
            dt = self._clock() - t0
            self.steps += 1
            self.clock += dt
            self.step_times.append(dt)
            if self.program is not None:
                self.inner_times.append(self.program.last_timings["inner"])
            if not math.isfinite(loss):
                self.diverged = True
            if self.clock >= next_eval or self.diverged or self.clock >= until_s:
                self.evaluate(x_eval)
                next_eval = self.clock + max(eval_every, eval_frac * self.clock)

    def record(self, targets: Sequence[float], rate: float) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "setting": self.setting, "steps": self.steps, "clock_s": self.clock,
                               "diverged": self.diverged, "evals": self.evals, "compile_s": self.compile_s,
                               "median_step_s": _median(self.step_times[1:] or self.step_times),
                               "final_loss": self.evals[-1][2] if self.evals else float("nan"),
                               "budget_s": getattr(self, "budget_s", None)}
        for t in targets:
            hit = next(((s, c) for s, c, loss in self.evals if loss <= t), None)
            out[f"to_{t:g}"] = {"steps": hit[0], "s": hit[1]} if hit else None
        if self.inner_flops is not None:
            out["median_inner_s"] = _median(self.inner_times[1:] or self.inner_times)
            out["gflops"] = self.inner_flops / out["median_inner_s"] / 1e9
            out["gflops_of"] = "inner phase"
        elif self.step_flops is not None:
            out["gflops"] = self.step_flops / out["median_step_s"] / 1e9
            out["gflops_of"] = "whole step"
        if "gflops" in out:
            out["pct_of_matmul"] = 100.0 * out["gflops"] / rate
        return out


# ---------------------------------------------------------------- method builders
def make_backprop(kind: str, lr: float, sizes: Sequence[int], x_train: torch.Tensor, batch_size: int,
                  seed: int, clock: Callable[[], float] = time.perf_counter) -> Run:
    model = deep_autoencoder(sizes, seed=seed)
    opt = backprop_optimizer(kind, model.parameters(), lr)

    def step(xb: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        loss = sigmoid_xent_sum(model(xb), xb)
        loss.backward()
        opt.step()
        return float(loss.detach())

    n_params = sum(p.numel() for p in model.parameters())
    return Run(kind, f"lr {lr:g}", step, model, x_train, batch_size, seed, step_flops=6.0 * n_params * batch_size,
               clock=clock)


def inner_flops_per_step(prog: lwcompile.Program, batch_size: int) -> int:
    """FLOPs of one step's inner phase: T iterations, or one exact solve per block (runtime/costs.py), less the
    first pre-activation (one forward of the block) when ``Config.reuse_preactivation`` hands it in."""
    reuse = prog.config.reuse_preactivation
    if prog.config.inner_optimizer == "exact":
        return sum(exact_flops(b, batch_size, preact_given=reuse) for b in prog.blocks)
    total = sum(b.inner_flops(prog.config.steps, batch_size) for b in prog.blocks)
    return total - (sum(b.flops_per_example * batch_size for b in prog.blocks) if reuse else 0)


def make_lwcompile(name: str, cfg: lwcompile.Config, sizes: Sequence[int], x_train: torch.Tensor, batch_size: int,
                   seed: int, clock: Callable[[], float] = time.perf_counter) -> Run:
    """An lwcompile run; compiling (tracing the target and inner graphs) happens here, off the training clock."""
    t0 = time.perf_counter()
    model = deep_autoencoder(sizes, seed=seed, output_sigmoid=True)  # the paper's last block: a sigmoid transfer
    example = x_train[:batch_size]
    prog = lwcompile.transform(model, bce_sum, (example,), cfg)
    prog.build_target_graph(example)
    prog.inner_graphs  # noqa: B018  (traces every block's inner graph now)
    if cfg.compile_inner:  # torch.compile compiles each inner graph at its first call: make that call here
        prog.profile(example, example, repeats=1)
    return Run(name, describe(cfg), lambda xb: prog.step(xb, xb), outputs_to_logits(model), x_train, batch_size, seed,
               program=prog, inner_flops=inner_flops_per_step(prog, batch_size), clock=clock,
               compile_s=time.perf_counter() - t0)


def describe(cfg: lwcompile.Config) -> str:
    """The fields of ``cfg`` that differ from ``Config()``, as ``Config(...)`` source."""
    base = lwcompile.Config()
    diff = [f"{k}={getattr(cfg, k)!r}" for k in cfg.__dataclass_fields__ if getattr(cfg, k) != getattr(base, k)]
    return f"Config({', '.join(diff)})"


def make_peer(sizes: Sequence[int], x_train: torch.Tensor, batch_size: int, seed: int,
              clock: Callable[[], float] = time.perf_counter) -> Run | None:
    """The PyPI ``locoprop`` package's trainer on the same init, or None when it is not installed."""
    try:
        from locoprop import LocoLayer, LocopropTrainer
    except ImportError:
        return None
    model = deep_autoencoder(sizes, seed=seed, output_sigmoid=True)
    layers, mods = [], list(model)
    for i, m in enumerate(mods):
        if isinstance(m, torch.nn.Linear):
            nxt = mods[i + 1] if i + 1 < len(mods) and not isinstance(mods[i + 1], torch.nn.Linear) else None
            layers.append(LocoLayer(m, nxt if nxt is not None else torch.nn.Identity()))
    trainer = LocopropTrainer(torch.nn.Sequential(*layers), bce_sum, local_iterations=10)
    return Run("peer", "locoprop 0.1.0: LocoProp-M, T=10, RMSprop lr 2e-5", lambda xb: trainer.step(xb, xb).detach(),
               outputs_to_logits(model), x_train, batch_size, seed, clock=clock)


# ---------------------------------------------------------------- the benchmark
def run_benchmark(x_train: torch.Tensor, x_eval: torch.Tensor, sizes: Sequence[int], batch_size: int,
                  methods: Sequence[str], targets: Sequence[float], budget_s: float, grid: dict[str, Sequence[float]],
                  grid_s: float, eval_every: float, seed: int = 0, log: Callable[[str], None] = print,
                  eval_frac: float = 0.01,
                  method_budget: dict[str, float] | None = None, deadline_s: float = math.inf,
                  lever_steps: int = 0) -> dict[str, Any]:
    t_start = time.perf_counter()
    res: dict[str, Any] = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                           "sizes": list(sizes), "batch_size": batch_size, "seed": seed, "targets": list(targets),
                           "budget_s": budget_s, "grid_s": grid_s, "n_eval": int(x_eval.shape[0]),
                           "eval_every": eval_every, "eval_frac": eval_frac,
                           "matmul_gflops": [matmul_gflops()], "runs": [], "grid": [], "notes": []}
    log(f"CPU: {res['cpu']}; torch threads {res['threads']}; float32 matmul {res['matmul_gflops'][0]:.1f} GFLOP/s")
    with torch.no_grad():
        init = deep_autoencoder(sizes, seed=seed).double()
        res["init_eval_loss_float64"] = full_loss(init, x_eval.double())
    stop = min(targets)
    runs: list[Run] = []
    for m in methods:
        if time.perf_counter() - t_start > deadline_s:
            note = f"{m} skipped: the benchmark passed its --deadline-s of {deadline_s:g} s before it started."
            res["notes"].append(note)
            log(note)
            continue
        budget = (method_budget or {}).get(m, budget_s)
        if m in GRID:
            cands = [make_backprop(m, lr, sizes, x_train, batch_size, seed) for lr in grid[m]]
            for r in cands:
                r.train(x_eval, grid_s, stop, eval_every, eval_frac)
                res["grid"].append({"name": m, "setting": r.setting, "clock_s": r.clock, "loss": r.evals[-1][2]})
                log(f"  grid {m} {r.setting}: loss {r.evals[-1][2]:.2f} after {r.clock:.1f} s")
            finite = [r for r in cands if math.isfinite(r.evals[-1][2])]
            run = min(finite or cands, key=lambda r: r.evals[-1][2])
        elif m == "peer":
            run = make_peer(sizes, x_train, batch_size, seed)
            if run is None:
                note = ("peer skipped: the PyPI package `locoprop` is not installed (pip install --no-deps locoprop).")
                res["notes"].append(note)
                log(note)
                continue
        else:
            run = make_lwcompile(m, (RECIPES | OPTIONAL_RECIPES)[m], sizes, x_train, batch_size, seed)
        run.train(x_eval, budget, stop, eval_every, eval_frac)
        run.budget_s = budget
        runs.append(run)
        log(f"{run.name} ({run.setting}): {run.steps} steps, {run.clock:.1f} s clocked, loss {run.evals[-1][2]:.2f}")
    recipes = {m: RECIPES[m] for m in methods if m in RECIPES}
    if lever_steps and recipes:
        log("levers on/off (interleaved):")
        res["levers"] = measure_levers(recipes, list(LEVERS), x_train, sizes, batch_size, lever_steps, seed, log)
        res["lever_steps"] = lever_steps
    res["matmul_gflops"].append(matmul_gflops())
    rate = max(res["matmul_gflops"])
    res["runs"] = [r.record(targets, rate) for r in runs]
    res["goals"] = goals(res["runs"], targets)
    res["total_s"] = time.perf_counter() - t_start
    return res


def goals(recs: Sequence[dict[str, Any]], targets: Sequence[float]) -> dict[str, Any]:
    """The issue's goals as measured ratios: {"value": a / b, "bound": "="}, or {"value": a / clock_b, "bound": "<"}
    when only ``a`` reached the loss (b did not within its clocked budget), or None when neither bound is known."""
    by = {r["name"]: r for r in recs}
    hi, lo = f"to_{max(targets):g}", f"to_{min(targets):g}"

    def ratio(a: str, b: str, key: str) -> dict[str, Any] | None:
        if a not in by or b not in by or not by[a].get(key):
            return None
        if by[b].get(key):
            return {"value": by[a][key]["s"] / by[b][key]["s"], "bound": "="}
        return {"value": by[a][key]["s"] / by[b]["clock_s"], "bound": "<"}

    def step_ratio(a: str) -> dict[str, Any] | None:
        if by.get(a, {}).get("median_step_s") and by.get("peer", {}).get("median_step_s"):
            return {"value": by[a]["median_step_s"] / by["peer"]["median_step_s"], "bound": "="}
        return None

    out = {
        f"defaults / peer, time to {max(targets):g} (goal < 1)": ratio("defaults", "peer", hi),
        "paper-M / peer, median step time (goal <= 0.5)": step_ratio("paper-M"),
        f"best / adam, time to {max(targets):g} (goal <= 0.4)": ratio("best", "adam", hi),
        f"best / adam, time to {min(targets):g} (goal <= 0.7)": ratio("best", "adam", lo),
    }
    if "paper-M+compile" in by:  # the same step with compiled inner graphs (Config.compile_inner)
        out["paper-M+compile / peer, median step time (goal <= 0.5)"] = step_ratio("paper-M+compile")
    return out


def format_markdown(res: dict[str, Any]) -> str:
    targets = res["targets"]
    mm = res["matmul_gflops"]
    head = " | ".join(f"steps to {t:g} | s to {t:g}" for t in targets)
    lines = [
        "# Time to a train-loss target: deep autoencoder",
        "",
        f"CPU: {res['cpu']}, {res['threads']} torch threads, torch {res['torch']}. Data: {res['data']}, net "
        f"{'-'.join(map(str, res['sizes']))}, batch {res['batch_size']}, seed {res['seed']}; same init and batch "
        f"order for every method. Loss: sigmoid cross-entropy summed over pixels, mean over the {res['n_eval']} "
        f"fixed training images evaluated outside the clock (init: {res['init_eval_loss_float64']:.2f}, float64), "
        f"every max({res.get('eval_every', 2):g} s, {100 * res.get('eval_frac', 0.05):g} % of the clocked time so far): "
        "a time to a target is the first evaluation at or below it. "
        f"Budget {res['budget_s']:g} s of clocked training per method" + "".join(
            f", {r['name']} {r['budget_s']:g} s" for r in res["runs"] if r.get("budget_s") not in (None, res["budget_s"]))
        + ". Seconds are ratios within this run only.",
        "",
        f"| method | setting | {head} | median step (s) | GFLOP/s | % of matmul | final loss |",
        "| --- | --- | " + " | ".join("---: | ---:" for _ in targets) + " | ---: | ---: | ---: | ---: |",
    ]
    for r in res["runs"]:
        cells = []
        for t in targets:
            hit = r[f"to_{t:g}"]
            cells.append(f"{hit['steps']} | {hit['s']:.1f}" if hit else "— | —")
        gf = f"{r['gflops']:.1f} ({r['gflops_of']})" if "gflops" in r else "—"
        pct = f"{r['pct_of_matmul']:.0f}%" if "pct_of_matmul" in r else "—"
        lines.append(f"| {r['name']} | {r['setting']} | {' | '.join(cells)} | {r['median_step_s']:.3f} | {gf} | "
                     f"{pct} | {r['final_loss']:.2f} |")
    lines += ["", f"Float32 matmul rate (1000×1000 @ 1000×784, best of 3, at start / end): {mm[0]:.1f} / {mm[-1]:.1f} "
              "GFLOP/s. — = not reached within the budget.", "", "## Goals (ratios of clocked seconds)", ""]
    for k, v in res["goals"].items():
        lines.append(f"- {k}: " + (f"**{'' if v['bound'] == '=' else '< '}{v['value']:.2f}**" if v is not None
                                   else "not measurable (the first run did not reach it within its budget)"))
    if res.get("levers"):
        lines += ["", "## Levers on and off (same mathematics; `python benchmarks/levers.py`)", ""]
        lines += format_levers(res["levers"], res["lever_steps"])
    lines += ["", "Compile (tracing) time, off the clock: " + ", ".join(
        f"{r['name']} {r['compile_s']:.1f} s" for r in res["runs"] if r.get("compile_s")) + "."]
    if res["grid"]:
        lines += ["", "## Learning-rate grid (each lr trained the grid time; the best continued)", "",
                  "| method | setting | clocked s | eval loss |", "| --- | --- | ---: | ---: |"]
        lines += [f"| {g['name']} | {g['setting']} | {g['clock_s']:.1f} | {g['loss']:.2f} |" for g in res["grid"]]
    lines += [""] + [f"Note: {n}" for n in res["notes"]] + ["", f"Total benchmark time {res['total_s']:.0f} s.", ""]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in res["runs"]:
        ev = [(c, loss) for _, c, loss in r["evals"] if math.isfinite(loss)]
        ax.plot([c for c, _ in ev], [loss for _, loss in ev], "-" if r["name"] in ("defaults", "best") else "--",
                label=f"{r['name']} ({r['setting'][:48]})")
    for t in res["targets"]:
        ax.axhline(t, color="grey", lw=0.6)
    ax.set_xlabel("clocked training seconds (evaluation excluded)")
    ax.set_ylabel(f"train loss ({res['n_eval']} fixed images)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"{res['data']} autoencoder, {res['cpu'][:60]}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="auto", help="MNIST idx directory; 'auto' = ../shared/data/mnist if present")
    p.add_argument("--out", type=Path, default=Path("runs/time-to-target"))
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated: {', '.join(METHODS)} (default), {', '.join(OPTIONAL_METHODS)}")
    p.add_argument("--targets", default=None, help="loss targets, comma-separated (default 100,80,70 on MNIST)")
    p.add_argument("--budget-s", type=float, default=None, help="clocked seconds per method (default 150; quick 3)")
    p.add_argument("--grid-s", type=float, default=None, help="clocked seconds per grid lr (default 20; quick 1)")
    p.add_argument("--eval-every", type=float, default=None, help="min clocked seconds between evals (default 1)")
    p.add_argument("--eval-frac", type=float, default=0.01,
                   help="min spacing of evals as a fraction of the clocked time so far (default 0.01)")
    p.add_argument("--method-budget", default="", help="per-method budgets, e.g. defaults=60,peer=120")
    p.add_argument("--deadline-s", type=float, default=math.inf, help="start no method after this many seconds")
    p.add_argument("--n-eval", type=int, default=10_000, help="fixed training images the loss is evaluated on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--lever-steps", type=int, default=None,
                   help="steps per side of each lever's on/off measurement, 0 = none (default 8; quick 2)")
    p.add_argument("--quick", action="store_true", help="scikit-learn digits, short budgets: < 1 minute")
    a = p.parse_args(argv)
    setup_torch(a.threads)
    x_train, name, sizes, batch_size = load_autoencoder_data(a.data_dir, a.quick)
    g = torch.Generator().manual_seed(a.seed)
    x_eval = x_train[torch.randperm(x_train.shape[0], generator=g)[:a.n_eval]]
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS + OPTIONAL_METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS + OPTIONAL_METHODS)}")
    targets = tuple(float(t) for t in a.targets.split(",")) if a.targets else TARGETS[name]
    budget = a.budget_s if a.budget_s is not None else (3.0 if a.quick else 150.0)
    grid_s = a.grid_s if a.grid_s is not None else (1.0 if a.quick else 20.0)
    eval_every = a.eval_every if a.eval_every is not None else (0.2 if a.quick else 1.0)
    res = run_benchmark(x_train, x_eval, sizes, batch_size, methods, targets, budget, QUICK_GRID if a.quick else GRID,
                        grid_s, eval_every, seed=a.seed, deadline_s=a.deadline_s, eval_frac=a.eval_frac,
                        lever_steps=a.lever_steps if a.lever_steps is not None else (2 if a.quick else 8),
                        method_budget={k: float(v) for k, v in (kv.split("=") for kv in a.method_budget.split(",") if kv)})
    res |= {"data": name, "n_train": int(x_train.shape[0])}
    write_results(a.out, res, format_markdown(res), plot, "loss_vs_time.png")
    return res


if __name__ == "__main__":
    main()
