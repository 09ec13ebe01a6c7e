"""Where a training step's time goes: the target graph call, the inner graph calls, and everything else.

"Other" (total − target-graph call − inner-graph calls) is the fixed cost of a step that is not the method's
arithmetic: guards, finiteness checks, the rollback snapshot, argument packing, commit. Runs at one thread;
the rounds of the workloads interleave so a loaded machine slows all of them alike (compare shares, not times).

    .venv/bin/python benchmarks/step_overhead.py --steps 30 --rounds 3
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import lwcompile
import lwcompile.program as program_mod
from lwcompile.experiments.workloads import WORKLOADS


class _Timed:
    """Wraps a callable and adds its wall time to ``acc[key]``."""

    def __init__(self, fn, acc: dict, key: str) -> None:
        self.fn, self.acc, self.key = fn, acc, key

    def __call__(self, *args):
        t = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.acc[self.key] += time.perf_counter() - t


def _setup(name: str):
    w = WORKLOADS[name].load("auto")
    model = w.build(seed=0)
    xb, yb = w.batch(0)
    prog = lwcompile.transform(model, w.loss_fn, (xb,))
    prog.step(xb, yb)  # traces everything
    return prog, xb, yb


def measure(prog, xb, yb, steps: int) -> dict[str, float]:
    """Mean per-step seconds: total, target graph call, inner graph calls, other."""
    acc = {"target": 0.0, "inner": 0.0}
    for k, (gm, sig) in list(prog._target_cache.items()):
        prog._target_cache[k] = (_Timed(gm, acc, "target"), sig)
    real_run = program_mod.run_jobs

    def timed_run(jobs, assignment=None):
        return real_run({n: (_Timed(f, acc, "inner"), a) for n, (f, a) in jobs.items()}, assignment)

    program_mod.run_jobs = timed_run
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            prog.step(xb, yb)
        total = (time.perf_counter() - t0) / steps
    finally:
        program_mod.run_jobs = real_run
        for k, (gm, sig) in list(prog._target_cache.items()):
            prog._target_cache[k] = (gm.fn if isinstance(gm, _Timed) else gm, sig)
    tg, inner = acc["target"] / steps, acc["inner"] / steps
    return {"total": total, "target": tg, "inner": inner, "other": total - tg - inner}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=["mlp", "lm"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    setups = {n: _setup(n) for n in a.workloads}
    rows: dict[str, list[dict]] = {n: [] for n in a.workloads}
    for _ in range(a.rounds):  # interleaved
        for n, (prog, xb, yb) in setups.items():
            rows[n].append(measure(prog, xb, yb, a.steps))
    print(f"{'workload':10} {'total ms':>9} {'target ms':>10} {'inner ms':>9} {'other ms':>9} {'other %':>8}")
    for n, rs in rows.items():
        m = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        share = statistics.median(r["other"] / r["total"] for r in rs)
        print(f"{n:10} {m['total'] * 1e3:9.2f} {m['target'] * 1e3:10.2f} {m['inner'] * 1e3:9.2f} "
              f"{m['other'] * 1e3:9.2f} {100 * share:7.1f}%")


if __name__ == "__main__":
    main()
