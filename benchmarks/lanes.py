"""Benchmark: does running independent blocks' inner loops concurrently (lanes: threads on one CPU) beat running
them one after another, each op using torch's intra-op thread pool?

Each case (model × Config) is compiled once per variant from the same init; the variants then step in turn
(interleaved, so that load from other processes hits them alike) and the script reports the median inner-phase
time (``prog.last_timings["inner"]``) and its ratio to ``seq``. Variants:

* ``seq``      blocks one after another on the calling thread, each op on torch's intra-op pool (the default);
* ``seq-t1``   the same with one intra-op thread (how much intra-op parallelism gives);
* ``lanes``    two lanes from ``prog.plan(2)`` (cost-balanced), run as ``step(assignment=...)``: one thread per lane,
  each with the default intra-op pool (so 2 × threads workers share the cores);
* ``lanes-t1`` the same lanes, each lane thread limited to one intra-op thread (``torch.set_num_threads(1)`` in the
  lane; see :class:`LaneRunner` for why it restores the count afterwards).

    python benchmarks/lanes.py --data-dir ../shared/data/mnist   # MNIST autoencoder, 3 Configs, and a small MLP
    python benchmarks/lanes.py --quick    # digits-sized autoencoder and the MLP, 3 steps each: ~1 min

Numbers are ratios within one run on one machine: the CPU is printed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lwcompile  # noqa: E402
from lwcompile.experiments.data import batches, load_images  # noqa: E402
from lwcompile.experiments.models import AUTOENCODER_SIZES, bce_sum, deep_autoencoder, mlp  # noqa: E402
from lwcompile.runtime.local import Job, run_jobs  # noqa: E402
from time_to_target import RECIPES, cpu_name  # noqa: E402

VARIANTS = ("seq", "seq-t1", "lanes", "lanes-t1")
CONFIGS = {"defaults": RECIPES["defaults"], "paper-M": RECIPES["paper-M"], "exact-S": RECIPES["best"]}


class LaneRunner:
    """A ``Program.step(runner=...)`` that runs an assignment's groups in threads, each thread first setting torch's
    intra-op thread count to ``threads`` (None: leave it). A single group runs on the calling thread.

    ``torch.set_num_threads`` called in a thread changes that thread's OpenMP pool *and* the count that threads
    created afterwards start with, but not threads that already exist (measured: see docs/performance.md); so
    each lane restores the count it found, leaving the process as it was.
    """

    def __init__(self, assignment: Mapping[str, Sequence[str]], threads: int | None) -> None:
        self.groups = [list(g) for g in assignment.values() if g]
        self.threads = threads

    def _lane(self, names: Sequence[str], jobs: Mapping[str, Job]) -> dict[str, tuple]:
        before = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            return run_jobs({n: jobs[n] for n in names})
        finally:
            torch.set_num_threads(before)

    def run_jobs(self, jobs: Mapping[str, Job]) -> dict[str, tuple]:
        if len(self.groups) == 1:
            return self._lane(self.groups[0], jobs)
        out: dict[str, tuple] = {}
        with ThreadPoolExecutor(len(self.groups)) as pool:  # leaving it waits for every lane, even when one raised
            for f in [pool.submit(self._lane, g, jobs) for g in self.groups]:
                out.update(f.result())
        return out


def make_case(model_fn: Callable[[], torch.nn.Module], loss: Callable, cfg: lwcompile.Config,
              xb: torch.Tensor, yb: torch.Tensor) -> dict[str, Callable[[], float]]:
    """One program per variant, same init; returns variant -> a function doing one step and returning its
    inner-phase seconds."""
    steps: dict[str, Callable[[], float]] = {}
    for v in VARIANTS:
        prog = lwcompile.transform(model_fn(), loss, (xb,), cfg)
        one = {"sim:0": [b.name for b in prog.blocks]}
        kw: dict[str, Any] = {
            "seq": {},
            "seq-t1": {"runner": LaneRunner(one, 1)},
            "lanes": {"assignment": prog.plan(2).assignment},
            "lanes-t1": {"runner": LaneRunner(prog.plan(2).assignment, 1)},
        }[v]

        def step(prog: lwcompile.Program = prog, kw: dict = kw) -> float:
            prog.step(xb, yb, **kw)
            return prog.last_timings["inner"]

        steps[v] = step
    return steps


def measure(steps: Mapping[str, Callable[[], float]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median inner seconds per variant over `rounds` interleaved steps (after `warmup` untimed rounds)."""
    times: dict[str, list[float]] = {v: [] for v in steps}
    for r in range(warmup + rounds):
        order = list(steps) if r % 2 == 0 else list(steps)[::-1]  # alternate who goes first
        for v in order:
            t = steps[v]()
            if r >= warmup:
                times[v].append(t)
    return {v: sorted(ts)[len(ts) // 2] for v, ts in times.items()}


def cases(quick: bool, data_dir: str = "auto") -> list[tuple[str, Callable[[], dict[str, Callable[[], float]]]]]:
    x, data = load_images(None if quick else data_dir, "train")
    sizes, bs = (AUTOENCODER_SIZES, 1000) if data == "mnist" else ((64, 128, 64, 32, 16, 32, 64, 128, 64), 100)
    xb = next(iter(batches(x, bs, epoch=0, seed=0)))
    out = []
    for name, cfg in CONFIGS.items():
        def ae(cfg: lwcompile.Config = cfg) -> dict[str, Callable[[], float]]:
            return make_case(lambda: deep_autoencoder(sizes, seed=0, output_sigmoid=True), bce_sum, cfg, xb, xb)
        out.append((f"autoencoder {data} b{bs}, {name}", ae))
    g = torch.Generator().manual_seed(0)
    xm, ym = torch.randn(128, 128, generator=g), torch.randn(128, 10, generator=g)
    for name in ("defaults", "paper-M"):
        def small(cfg: lwcompile.Config = CONFIGS[name]) -> dict[str, Callable[[], float]]:
            return make_case(lambda: mlp((128,) * 6 + (10,), "tanh", seed=0), torch.nn.functional.mse_loss, cfg,
                             xm, ym)
        out.append((f"MLP 128x6 b128, {name}", small))
    return out


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="digits-sized autoencoder, few steps")
    p.add_argument("--data-dir", default="auto", help="MNIST idx directory; 'auto' = ../shared/data/mnist if present")
    p.add_argument("--only", default="", help="run only the cases whose name contains this text (e.g. MLP)")
    p.add_argument("--rounds", type=int, default=None, help="timed interleaved steps per variant (default 12; quick 3)")
    a = p.parse_args(argv)
    rounds = a.rounds or (3 if a.quick else 12)
    torch.set_flush_denormal(True)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; "
          f"median of {rounds} interleaved steps")
    print("| case | " + " | ".join(f"{v} ms" for v in VARIANTS) + " | " +
          " | ".join(f"{v}/seq" for v in VARIANTS[1:]) + " | lanes-t1/seq-t1 |")
    print("|---" + "|---:" * (2 * len(VARIANTS)) + "|")
    rows = []
    for name, build in cases(a.quick, a.data_dir):
        if a.only not in name:
            continue
        t0 = time.perf_counter()
        med = measure(build(), rounds)
        rows.append({"case": name, **med})
        print(f"| {name} | " + " | ".join(f"{1e3 * med[v]:.1f}" for v in VARIANTS) + " | " +
              " | ".join(f"{med[v] / med['seq']:.2f}" for v in VARIANTS[1:]) +
              f" | {med['lanes-t1'] / med['seq-t1']:.2f} |  <!-- {time.perf_counter() - t0:.0f} s -->", flush=True)
    return rows


if __name__ == "__main__":
    main()
