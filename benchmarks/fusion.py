"""Inner phase with fusion of identical blocks (``Config(fuse=True)``) against without, per workload.

Two programs per row, the same model copy and batches, differing only in ``Config.fuse``; their steps alternate
(so a loaded machine slows both alike) and each step's ``prog.last_timings["inner"]`` (the inner loops, the fused
jobs' stacking included) and ``["total"]`` are kept; the table shows medians. Rows: 12-layer causal transformers
(``CharTransformerLM``, d 64 / 128, small batches: each layer's 4 projections form 4 groups of 12) and the
workloads of :mod:`lwcompile.experiments.workloads` (MNIST MLP / CNN / autoencoder have no identical blocks: the
row shows what fusion costs where there is nothing to fuse). Prints a table and writes
``docs/results/fusion/results.md``.

    .venv/bin/python benchmarks/fusion.py            # full: ~5 min on 2 cores
    .venv/bin/python benchmarks/fusion.py --quick    # two small rows, seconds
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_setup import setup_torch  # noqa: E402

import lwcompile  # noqa: E402
from lwcompile.experiments.workloads import WORKLOADS, CharTransformerLM, lm_loss  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "fusion" / "results.md"


def transformer_row(d: int, batch: int, seq: int = 32, layers: int = 12, vocab: int = 64):
    """(model, loss, batches) for a ``layers``-layer causal transformer on random tokens."""
    def make(steps: int):
        g = torch.Generator().manual_seed(1)
        model = CharTransformerLM(vocab, seq=seq, d=d, layers=layers, heads=4, seed=0)
        data = [(torch.randint(0, vocab, (batch, seq), generator=g), torch.randint(0, vocab, (batch, seq), generator=g))
                for _ in range(steps)]
        return model, lm_loss, data
    return make


def workload_row(name: str):
    def make(steps: int):
        w = WORKLOADS[name].load("auto")
        return w.build(seed=0), w.loss_fn, [w.batch(k) for k in range(steps)]
    return make


def measure(make: Callable, steps: int, warmup: int = 2) -> dict[str, float]:
    """Median inner and total seconds per step, fused and unfused, from alternating steps."""
    model, loss_fn, data = make(steps + warmup)
    progs = {}
    for fuse in (False, True):
        progs[fuse] = lwcompile.transform(copy.deepcopy(model), loss_fn, (data[0][0],), lwcompile.Config(fuse=fuse))
    times: dict[bool, dict[str, list[float]]] = {f: {"inner": [], "total": []} for f in progs}
    for k, (x, y) in enumerate(data):
        for fuse, prog in (progs.items() if k % 2 else reversed(list(progs.items()))):
            prog.step(x, y)
            if k >= warmup:
                for key in ("inner", "total"):
                    times[fuse][key].append(prog.last_timings[key])
    med = {f"{key}_{'fused' if f else 'unfused'}": statistics.median(v)
           for f, t in times.items() for key, v in t.items()}
    groups = progs[True].fusion.groups
    med["blocks"] = len(progs[True].blocks)
    med["jobs"] = len(progs[True].blocks) - sum(len(g) - 1 for g in groups)
    diff = max((p - q).abs().max().item() for p, q in zip(progs[True].model.parameters(),
                                                           progs[False].model.parameters()))
    med["max_param_diff"] = diff
    return med


ROWS = {
    "transformer 12L d64 batch 2×32": transformer_row(64, 2),
    "transformer 12L d64 batch 4×32": transformer_row(64, 4),
    "transformer 12L d128 batch 2×32": transformer_row(128, 2),
    "lm (workloads: 2L d64, batch 32×64)": workload_row("lm"),
    "mlp (workloads: 784-512-512-10, batch 256)": workload_row("mlp"),
    "cnn (workloads, batch 256)": workload_row("cnn"),
    "autoencoder (workloads)": workload_row("autoencoder"),
}
QUICK = {"transformer 4L d32 batch 4×16": transformer_row(32, 4, seq=16, layers=4),
         "mlp (workloads: 784-512-512-10, batch 256)": workload_row("mlp")}


NOTES = """Reading the table:

- A 12-layer transformer has 4 groups of 12 identical projections (attention in/out, the two feed-forward linears)
  and one head block: 49 jobs become 5 when every group fuses. The inner phase gains where a block's inner loop is
  dominated by per-op overhead (small batches, d 64); a fused job still does the same arithmetic, and it also stacks
  each member's weights, inputs, targets and pre-activations (the optimizer state it handed out comes back as rows
  of one tensor, not copied).
- Groups whose linear op costs more than `passes.fuse.FUSE_MAX_MACS` (2^21) multiply-adds per member on the example
  batch are left unfused (`prog.fusion.notes` says so): batched, they ran ~0.9x on this CPU (all groups of the d-128
  row fused: inner 0.89x in thread time; the workloads' 2-layer LM at 2048 rows: 0.88x). So the d-128 row fuses only
  its out-projections (49 -> 38 jobs) and the LM none.
- The MLP, CNN and autoencoder workloads have no identical blocks: their step is the unfused code path itself, and
  their rows show the machine's noise (2 cores shared with other jobs: rerun and compare ratios, not times).
- Parameters agree bitwise here (float32); tests/test_fuse.py checks fused against unfused to float64 rounding with
  rmsprop_tf1, adam, momentum and gd state over several steps, and the float64 SGD identity with fusion on.
"""


def table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| workload | blocks → jobs | inner unfused (ms) | inner fused (ms) | inner speed-up | "
             "step unfused (ms) | step fused (ms) | max \\|Δparam\\| after the run |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['blocks']} → {r['jobs']} | {1e3 * r['inner_unfused']:.1f} | "
                     f"{1e3 * r['inner_fused']:.1f} | **{r['inner_unfused'] / r['inner_fused']:.2f}×** | "
                     f"{1e3 * r['total_unfused']:.1f} | {1e3 * r['total_fused']:.1f} | {r['max_param_diff']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="measured steps per program and row")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="two small rows, few steps; writes nothing")
    ap.add_argument("--only", default="", help="run only rows whose name contains this")
    args = ap.parse_args()
    setup_torch(args.threads)
    rows = QUICK if args.quick else {k: v for k, v in ROWS.items() if args.only in k}
    steps = 6 if args.quick else args.steps
    results = {}
    t0 = time.perf_counter()
    for name, make in rows.items():
        results[name] = measure(make, steps)
        r = results[name]
        print(f"{name}: inner {1e3 * r['inner_unfused']:.1f} -> {1e3 * r['inner_fused']:.1f} ms", flush=True)
    md = table(results)
    print(md)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} thread(s), load average {load[0]:.1f} at the end")
    if not args.quick:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(
            "# Fusion of identical blocks: inner phase fused vs unfused\n\n"
            f"`.venv/bin/python benchmarks/fusion.py --steps {steps} --threads {args.threads}` "
            f"({time.perf_counter() - t0:.0f} s; {machine}). `Config()` defaults (LocoProp-M, T = 3, TF1-RMSProp) "
            "with `fuse` on and off; medians over alternating steps of `prog.last_timings` (inner: the inner loops "
            "including the fused jobs' stacking; step: the whole `Program.step`). Δparam: the largest difference "
            "between the two programs' parameters after all steps (float32).\n\n" + md + "\n\n" + NOTES)
        print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
