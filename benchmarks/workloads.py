"""Benchmark: time to train-loss targets on the four workloads users bring (autoencoder, CNN, MLP, char LM),
lwcompile against backprop optimizers, every method in one run.

The workloads are the rows of :data:`lwcompile.experiments.workloads.WORKLOADS`. On each, every method starts
from the same init (``--seed``), sees the same batches in the same order, and the methods take their steps in
turn (round robin: one step of each, then again), so all of them run under the same machine load. The clock is
each method's own step time; evaluation (the task loss on the workload's fixed training subset, the first
``--n-eval`` rows of it) is off the clock, every ``--eval-frac`` of the budget (or every ``--eval-steps`` steps).
A run stops at its budget, at a non-finite loss, or once it is below the tightest target. Methods:

* ``adam`` (lr 1e-3, 3e-3) and ``adamw`` (lr 1e-3, 3e-3, weight decay 0.01): torch.optim backprop; the ratios
  are against Adam's best of grid (per target, the lowest time of either lr).
* ``soap``, ``shampoo``, ``muon``: ``pytorch-optimizer`` 4.1.0 at its defaults (``scripts/install_bench.sh``;
  rows skipped with a note without it). Muon orthogonalizes only 2-D weight matrices (not the embedding); every
  other parameter (biases, norms, conv kernels, the embedding) takes its Adam group at lr 1e-3.
* ``defaults``: lwcompile with ``Config()``; and every entry of :data:`RECIPES` (add one there, or give
  ``--recipes 'name=gamma=100.0, steps=5'`` for a run).

Reported per workload and method: steps and seconds to each target and their ratio to Adam's best of grid, the
median step split into its two phases (lwcompile: target graph / inner phase, from ``prog.last_timings``;
backprop: forward+backward / optimizer step) and the rest, and peak memory against Adam's. Peak memory: each
run's model, optimizer or program and first two steps run inside a :class:`bench_setup.MemoryWindow` (PyTorch's
allocator records, on CPU too), and its peak is the most tensor memory alive during the second step, counting
everything the run allocated (weights, optimizer state, what a program keeps, the step's temporaries) but not the
data. The issue's goals are printed last. Writes ``results.md``, ``results.json`` and
``loss_vs_seconds_<workload>.png`` to ``--out``.

    python benchmarks/workloads.py                      # all four, ~20 min on 2 idle cores (--budget 20)
    python benchmarks/workloads.py --quick              # digits, tiny budgets: well under a minute
    python benchmarks/workloads.py --workloads mlp,lm --methods adam,soap,exact --budget 60

Numbers are ratios within one run on one machine: the CPU is printed and recorded.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lwcompile  # noqa: E402
from bench_setup import MemoryWindow, setup_torch, write_outputs  # noqa: E402
from lwcompile.experiments.workloads import WORKLOADS, LoadedWorkload  # noqa: E402
from time_to_target import cpu_name, describe  # noqa: E402
from workloads_report import format_markdown, goals, plot_workload  # noqa: E402

# Named lwcompile recipes, each a row of the benchmark (selected by name in --methods). Adding one is one line.
RECIPES: dict[str, lwcompile.Config] = {
    # LocoProp-S with the exact inner solve (benchmarks/time_to_target.py's "best" on the autoencoder)
    "exact": lwcompile.Config(target="gd_pre", local_loss="squared_pre", inner_optimizer="exact", gamma=500.0,
                              prox=50.0),
    # the same with damping relative to each block's own Gram scale (lambda = prox * tr(X^T X) / D per block and batch;
    # benchmarks/recipe_workloads.py's study: best on the CNN, as good as "exact" on the MLP)
    "exact-rel": lwcompile.Config(target="gd_pre", local_loss="squared_pre", inner_optimizer="exact", gamma=500.0,
                                  prox=1.0, prox_relative=True),
    # LocoProp-S exact on the MLP/conv/feed-forward blocks only: attention projections and a tied output head (where
    # the exact update, proportional to the gradient, barely moves q/k: benchmarks/lm_study.py) go to Adam 3e-3.
    # On models with no attention or head of those names nothing is skipped.
    "exact-ffn": lwcompile.Config(target="gd_pre", local_loss="squared_pre", inner_optimizer="exact", gamma=2000.0,
                                  prox=1.0, prox_relative=True, outer_lr=3e-3,
                                  skip=("^head$", r"self_attn\.in_proj", "out_proj")),
}
ADAM_LRS, ADAMW_LRS, ADAMW_DECAY = (1e-3, 3e-3), (1e-3, 3e-3), 0.01
BACKPROP = ("adam", "adamw", "soap", "shampoo", "muon")
Step = Callable[[torch.Tensor, torch.Tensor], tuple[float, dict[str, float]]]


@dataclass(frozen=True)
class Method:
    """One row: ``make(model, workload)`` returns its step function, (x, y) -> (loss, the step's two phases)."""

    name: str  # what --methods selects (a grid's lrs share it)
    family: str  # "adam", "adamw", "soap", "shampoo", "muon" or "lwcompile"
    setting: str
    make: Callable[[nn.Module, LoadedWorkload], Step]


def backprop_step(make_opt: Callable[[nn.Module], torch.optim.Optimizer]) -> Callable[..., Step]:
    def make(model: nn.Module, lw: LoadedWorkload) -> Step:
        opt = make_opt(model)

        def step(xb: torch.Tensor, yb: torch.Tensor) -> tuple[float, dict[str, float]]:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = lw.loss_fn(model(xb), yb)
            loss.backward()
            t1 = time.perf_counter()
            opt.step()
            return float(loss.detach()), {"forward+backward": t1 - t0, "optimizer step": time.perf_counter() - t1}
        return step
    return make


def lwcompile_step(cfg: lwcompile.Config) -> Callable[..., Step]:
    def make(model: nn.Module, lw: LoadedWorkload) -> Step:
        xb, yb = lw.batch(0)
        prog = lwcompile.transform(model, lw.loss_fn, (xb,), cfg, example_labels=yb)
        prog.build_target_graph(yb)  # traced here, off the clock, as time_to_target does
        prog.inner_graphs  # noqa: B018
        if cfg.compile_inner:  # torch.compile compiles each inner graph at its first call: make that call here
            prog.profile(xb, yb, repeats=1)

        def step(xb: torch.Tensor, yb: torch.Tensor) -> tuple[float, dict[str, float]]:
            loss = prog.step(xb, yb)
            t = prog.last_timings
            return loss, {"target graph": t["target"], "inner phase": t["inner"]}
        return step
    return make


def _muon(model: nn.Module) -> torch.optim.Optimizer:
    import pytorch_optimizer as po

    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    mats = [p for p in model.parameters() if p.ndim == 2 and id(p) not in emb]
    rest = [p for p in model.parameters() if id(p) not in {id(q) for q in mats}]
    groups = [dict(params=mats, use_muon=True)] + ([dict(params=rest, use_muon=False, lr=1e-3)] if rest else [])
    return po.Muon(groups)


def _po(name: str) -> Callable[[nn.Module], torch.optim.Optimizer]:
    def make(model: nn.Module) -> torch.optim.Optimizer:
        import pytorch_optimizer as po

        return getattr(po, name)(model.parameters())
    return make


def methods_table(recipes: dict[str, lwcompile.Config]) -> list[Method]:
    """Every row the benchmark can run, in table order: the backprop grids, pytorch-optimizer's, lwcompile's."""
    rows = [Method("adam", "adam", f"lr {lr:g}", backprop_step(lambda m, lr=lr: torch.optim.Adam(m.parameters(), lr)))
            for lr in ADAM_LRS]
    rows += [Method("adamw", "adamw", f"lr {lr:g}, wd {ADAMW_DECAY:g}", backprop_step(
        lambda m, lr=lr: torch.optim.AdamW(m.parameters(), lr, weight_decay=ADAMW_DECAY))) for lr in ADAMW_LRS]
    rows += [Method("soap", "soap", "pytorch-optimizer defaults (lr 3e-3, betas 0.95, wd 0.01)",
                    backprop_step(_po("SOAP"))),
             Method("shampoo", "shampoo", "pytorch-optimizer defaults (lr 1e-3)", backprop_step(_po("Shampoo"))),
             Method("muon", "muon", "2-D weights lr 0.02; the rest Adam lr 1e-3", backprop_step(_muon))]
    rows += [Method(name, "lwcompile", describe(cfg), lwcompile_step(cfg))
             for name, cfg in {"defaults": lwcompile.Config(), **recipes}.items()]
    return rows


def parse_recipe(text: str) -> tuple[str, lwcompile.Config]:
    """``name=KWARGS`` -> (name, Config(**KWARGS)); KWARGS as written inside ``Config(...)`` or a dict literal.

    >>> parse_recipe("s5=gamma=100.0, steps=5")[1].steps, parse_recipe('t={"gamma": 7.0}')[1].gamma
    (5, 7.0)
    """
    name, _, kw = text.partition("=")
    body = kw.strip()
    if body.startswith("{"):
        kwargs = ast.literal_eval(body)
    else:
        call = ast.parse(f"f({body})", mode="eval").body
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    return name.strip(), lwcompile.Config(**kwargs)


class Run:
    """One method on one workload from the shared init; ``advance`` takes one clocked step (and an evaluation
    when one is due, off the clock)."""

    def __init__(self, method: Method, lw: LoadedWorkload, seed: int, budget_s: float, eval_every_s: float,
                 eval_steps: int, stop_below: float) -> None:
        self.method, self.lw, self.seed, self.budget_s = method, lw, seed, budget_s
        self.eval_every_s, self.eval_steps, self.stop_below = eval_every_s, eval_steps, stop_below
        self.steps, self.clock, self.diverged, self.done = 0, 0.0, False, False
        self.step_times: list[float] = []
        self.parts: list[dict[str, float]] = []
        self.evals: list[tuple[int, float, float]] = []  # (steps, clocked seconds, eval loss)
        self.compile_s, self.peak_bytes = 0.0, None
        self.model: nn.Module | None = None

    def start(self) -> None:
        """Build, evaluate at step 0 and take two steps inside the memory window (the peak is the second's)."""
        with MemoryWindow() as mem:
            t0 = time.perf_counter()
            self.model = self.lw.build(seed=self.seed)
            self._step_fn = self.method.make(self.model, self.lw)
            self.compile_s = time.perf_counter() - t0
            self.evaluate()
            self.advance()
            with mem.region("step2"):
                self.advance()
        self.peak_bytes = mem.peak("step2")

    def evaluate(self) -> None:
        loss = float("nan") if self.diverged else self.lw.eval_loss(self.model)
        self.evals.append((self.steps, self.clock, loss))

    def _eval_due(self) -> bool:
        if self.eval_steps:
            return self.steps % self.eval_steps == 0
        return self.clock >= self.evals[-1][1] + self.eval_every_s

    def advance(self) -> None:
        if self.done:
            return
        xb, yb = self.lw.batch(self.steps)
        t0 = time.perf_counter()
        try:
            loss, parts = self._step_fn(xb, yb)
        except lwcompile.NonFiniteError:
            loss, parts = float("nan"), {}
        dt = time.perf_counter() - t0
        self.steps += 1
        self.clock += dt
        self.step_times.append(dt)
        self.parts.append(parts)
        self.diverged = not math.isfinite(loss)
        out_of_time = self.clock >= self.budget_s
        if self._eval_due() or self.diverged or out_of_time:
            self.evaluate()
        self.done = self.diverged or out_of_time or self.evals[-1][2] <= self.stop_below

    def record(self, targets: Sequence[float]) -> dict[str, Any]:
        later = list(range(1, len(self.step_times))) or list(range(len(self.step_times)))  # step 1 traces/warms
        names = list(dict.fromkeys(k for p in self.parts for k in p))
        split = {k: statistics.median(self.parts[i].get(k, 0.0) for i in later) for k in names}
        split["rest"] = statistics.median(self.step_times[i] - sum(self.parts[i].values()) for i in later)
        out: dict[str, Any] = {
            "name": self.method.name, "family": self.method.family, "setting": self.method.setting,
            "steps": self.steps, "clock_s": self.clock, "diverged": self.diverged, "evals": self.evals,
            "compile_s": self.compile_s, "median_step_s": statistics.median(self.step_times[i] for i in later),
            "split_s": split, "peak_bytes": self.peak_bytes, "final_loss": self.evals[-1][2],
            "init_loss": self.evals[0][2]}
        for t in targets:
            hit = next(((s, c) for s, c, loss in self.evals if loss <= t), None)
            out[f"to_{t:g}"] = {"steps": hit[0], "s": hit[1]} if hit else None
        return out


def run_workload(lw: LoadedWorkload, methods: Sequence[Method], budget_s: float, eval_frac: float,
                 eval_steps: int, seed: int, notes: list[str], log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every method on one workload, round robin; the workload's part of results.json."""
    runs: list[Run] = []
    for m in methods:
        run = Run(m, lw, seed, budget_s, eval_frac * budget_s, eval_steps, min(lw.targets))
        try:
            run.start()
        except lwcompile.LwcompileError as e:  # a model lwcompile cannot compile exactly: said, not hidden
            notes.append(f"{lw.name}: {m.name} skipped: {type(e).__name__}: {str(e).splitlines()[0]}")
            log(notes[-1])
            continue
        runs.append(run)
    log(f"{lw.name}: {len(runs)} runs built; round robin, {budget_s:g} s clocked each")
    active = [r for r in runs if not r.done]
    while active:
        for r in active:
            r.advance()
        active = [r for r in active if not r.done]
    recs = [r.record(lw.targets) for r in runs]
    adam_peak = next((r["peak_bytes"] for r in recs if r["family"] == "adam"), None)
    for r in recs:
        r["peak_vs_adam"] = r["peak_bytes"] / adam_peak if adam_peak and r["peak_bytes"] else None
        log(f"  {r['name']:>9} {r['setting'][:40]:40} {r['steps']:5d} steps {r['clock_s']:6.1f} s  "
            f"loss {r['final_loss']:.4g}")
    return {"data": lw.data, "description": WORKLOADS[lw.name].description, "targets": list(lw.targets),
            "batch_size": lw.batch_size, "n_train": int(lw.x.shape[0]), "n_eval": int(lw.eval_x.shape[0]),
            "runs": recs}


def shrink(lw: LoadedWorkload, n_eval: int, n_train: int | None = None) -> LoadedWorkload:
    """The workload evaluated on the first ``n_eval`` rows of its fixed subset (and trained on ``n_train`` rows)."""
    n = lw.x.shape[0] if n_train is None else min(n_train, lw.x.shape[0])
    return dataclasses.replace(lw, x=lw.x[:n], y=lw.y[:n], eval_x=lw.eval_x[:n_eval], eval_y=lw.eval_y[:n_eval],
                               _perm={})


def available(methods: Sequence[Method], notes: list[str]) -> list[Method]:
    """The rows that can run here: pytorch-optimizer's only when it is installed (a note otherwise)."""
    try:
        import pytorch_optimizer  # noqa: F401
        return list(methods)
    except ImportError:
        skipped = sorted({m.name for m in methods if m.family in ("soap", "shampoo", "muon")})
        if skipped:
            notes.append(f"{', '.join(skipped)} skipped: `pytorch-optimizer` is not installed "
                         "(scripts/install_bench.sh: pip install --no-deps pytorch-optimizer==4.1.0).")
        return [m for m in methods if m.family not in ("soap", "shampoo", "muon")]


def parse_budgets(text: str | None, workloads: Sequence[str], default: float) -> dict[str, float]:
    """``--budget``: "20" for all, or "20,autoencoder=40" (a bare number sets the rest), seconds > 0.

    >>> parse_budgets("12,autoencoder=30", ["autoencoder", "mlp"], 20.0)
    {'autoencoder': 30.0, 'mlp': 12.0}
    """
    rest, own = default, {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, _, value = part.rpartition("=")
        try:
            sec = float(value)
        except ValueError:
            raise ValueError(f"--budget: {part!r} is not seconds or WORKLOAD=seconds") from None
        if not sec > 0:
            raise ValueError(f"--budget: {part!r} must be > 0 seconds")
        if name and name not in workloads:
            raise ValueError(f"--budget: {name!r} is not one of the chosen workloads {', '.join(workloads)}")
        if name:
            own[name] = sec
        else:
            rest = sec
    return {w: own.get(w, rest) for w in workloads}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated of {', '.join(WORKLOADS)}")
    p.add_argument("--methods", default=None, help="comma-separated names (default: all): adam, adamw, soap, "
                   f"shampoo, muon, defaults, {', '.join(RECIPES)} and any --recipes")
    p.add_argument("--recipes", action="append", default=[], metavar="NAME=KWARGS",
                   help="an extra lwcompile row, e.g. 'mine=gamma=100.0, steps=5' (repeatable)")
    p.add_argument("--budget", default=None, metavar="S|W=S,...",
                   help="clocked seconds per method per workload (default 20; quick 0.25), or per workload, e.g. "
                   "'20,autoencoder=40' (a bare number is the rest's)")
    p.add_argument("--eval-frac", type=float, default=None, help="evaluate every this fraction of the budget "
                   "(default 0.04; quick 0.2)")
    p.add_argument("--eval-steps", type=int, default=0, help="evaluate every N steps instead (0: by --eval-frac)")
    p.add_argument("--n-eval", type=int, default=None,
                   help="rows of each workload's fixed subset the loss is measured on (default 2000; quick 128)")
    p.add_argument("--data-dir", default="auto", help="MNIST idx directory; 'auto' = ../shared/data/mnist if present, "
                   "'digits' = scikit-learn's 8x8 digits")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/results/workloads"))
    p.add_argument("--quick", action="store_true", help="digits, small slices, tiny budgets: for CI")
    a = p.parse_args(argv)
    setup_torch(a.threads)
    recipes = dict(RECIPES)
    for text in a.recipes:
        name, cfg = parse_recipe(text)
        recipes[name] = cfg
    table = methods_table(recipes)
    names = list(dict.fromkeys(m.name for m in table))
    chosen = names if a.methods is None else [s.strip() for s in a.methods.split(",") if s.strip()]
    bad = [m for m in chosen if m not in names]
    wl = [s.strip() for s in a.workloads.split(",") if s.strip()]
    if bad or any(w not in WORKLOADS for w in wl):
        p.error(f"unknown method or workload in {bad + [w for w in wl if w not in WORKLOADS]}; methods: "
                f"{', '.join(names)}; workloads: {', '.join(WORKLOADS)}")
    try:
        budgets = parse_budgets(a.budget, wl, 0.25 if a.quick else 20.0)
    except ValueError as e:
        p.error(str(e))
    budget = max(budgets.values())
    eval_frac = a.eval_frac if a.eval_frac is not None else (0.2 if a.quick else 0.04)
    n_eval = a.n_eval if a.n_eval is not None else (128 if a.quick else 2000)
    notes: list[str] = []
    methods = available([m for m in table if m.name in chosen], notes)
    t_start = time.perf_counter()
    res: dict[str, Any] = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                           "budget_s": budget, "budgets": budgets, "eval_frac": eval_frac, "eval_steps": a.eval_steps, "seed": a.seed,
                           "quick": a.quick, "methods": [m.name for m in methods], "recipes": {
                               n: describe(c) for n, c in recipes.items() if n in chosen}, "workloads": {},
                           "notes": notes}
    print(f"CPU: {res['cpu']}; torch threads {res['threads']}; budget (s per method) {budgets}")
    for w in wl:
        lw = WORKLOADS[w].load("digits" if a.quick and a.data_dir == "auto" else a.data_dir, seed=a.seed)
        lw = shrink(lw, n_eval, 512 if a.quick else None)
        res["workloads"][w] = run_workload(lw, methods, budgets[w], eval_frac, a.eval_steps, a.seed, notes)
    res["goals"] = goals(res["workloads"])
    res["total_s"] = time.perf_counter() - t_start
    plots = {f"loss_vs_seconds_{w}.png": (lambda path, w=w: plot_workload(res, w, path)) for w in res["workloads"]}
    write_outputs(a.out, res, format_markdown(res), plots)
    return res


if __name__ == "__main__":
    main()
