"""Data-parallel LocoProp on scikit-learn's 8x8 digits: every rank steps on its shard of each batch.

    torchrun --nproc-per-node 2 examples/torchrun_data_parallel.py --check
    torchrun --nproc-per-node 2 examples/torchrun_data_parallel.py --check --inner exact
    torchrun --nproc-per-node 4 examples/torchrun_data_parallel.py --check --layers 2   # hybrid: 2 shards x 2

Every rank builds the same model (same seed) and walks the same global batches, but passes ``step`` only its own
rows (``trainer.shard``); gradients, inner-loop gradients (or, with ``--inner exact``, the solve's Gram sums) are
all-reduced, so after each step all ranks hold the same model. ``--check`` (float64) trains the same model in one
process on the whole batches afterwards and exits non-zero when the largest relative difference exceeds 1e-9.
``--layers L`` makes a hybrid grid: world / L data-parallel shards, each shared by L ranks that split the blocks
(``prog.plan(devices=L, mode="replicated")``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import lwcompile
from lwcompile.experiments.data import load_digits_images, load_digits_labels
from lwcompile.runtime.data_parallel import DataParallelTrainer, allreduce_bytes
from lwcompile.runtime.distributed import init_from_env

TOLERANCE = 1e-9
# rmsprop_tf1's steps become sign-like (lr·g/√ms once ms has decayed), so float64 rounding grows about 3× per step
# in *any* two runs: one process against itself with the initial weights scaled by 1 + 1e-15 differs by 4.5e-5
# relative after 20 steps. The check compares after 8 steps, where rounding is still far below the tolerance
# (measured 1.4e-11; 2.3e-10 at 12, 1.2e-7 at 20); the exact solve stays at ~1e-15 for any length.
CHECK_STEPS = 8


def build(inner: str, seed: int = 0) -> tuple[nn.Module, lwcompile.Config]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10)).double()
    if inner == "exact":
        cfg = lwcompile.Config(target="gd_pre", local_loss="squared_pre", inner_optimizer="exact", prox=1.0,
                               gamma=1.0, outer_optimizer="adam", outer_lr=1e-3)
    else:
        cfg = lwcompile.Config(target="md_post", local_loss="matching", gamma=1.0, steps=5, inner_optimizer=inner,
                               inner_lr=1e-3, outer_optimizer="adam", outer_lr=1e-3)
    return model, cfg


def batches(x: torch.Tensor, y: torch.Tensor, size: int, steps: int, seed: int = 0):
    """The same global batches on every rank (a seeded permutation, full batches only)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    per_epoch = len(x) // size
    for k in range(steps):
        i = order[(k % per_epoch) * size:(k % per_epoch + 1) * size]
        yield x[i], y[i]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inner", choices=("rmsprop_tf1", "adam", "exact"), default="rmsprop_tf1")
    ap.add_argument("--steps", type=int, default=None, help="default 20, or 8 with --check (see CHECK_STEPS)")
    ap.add_argument("--batch", type=int, default=128, help="global batch (split across the ranks)")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--check", action="store_true", help="compare with one process on the whole batches")
    ap.add_argument("--layers", type=int, default=1, help="ranks per shard that split the blocks (hybrid grid)")
    args = ap.parse_args()
    if args.steps is None:
        args.steps = CHECK_STEPS if args.check else 20

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    init_from_env(backend="gloo", timeout=args.timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = load_digits_images("train").double(), load_digits_labels("train")

    model, cfg = build(args.inner)
    prog = lwcompile.transform(model, F.cross_entropy, x[: args.batch], cfg)
    # a fixed FLOP rate: every rank must make the same plan (a measured rate could break a tie differently)
    plan = prog.plan(devices=args.layers, mode="replicated", device_rate=1e9) if args.layers > 1 else None
    trainer = DataParallelTrainer(prog, timeout=args.timeout, plan=plan)
    if rank == 0:
        print(f"{world} ranks ({trainer.shards} shards x {args.layers}), inner {args.inner}; all-reduced per step "
              f"by rank 0: {allreduce_bytes(prog, trainer.mine)}", flush=True)
    t0 = time.perf_counter()
    for k, (xb, yb) in enumerate(batches(x, y, args.batch, args.steps)):
        loss = trainer.step(*trainer.shard((xb, yb)))
        if rank == 0 and (k % 5 == 0 or k == args.steps - 1):
            print(f"step {k:4d}  loss {loss:.6f}  step {1e3 * trainer.last_timings['total']:.1f} ms", flush=True)
    state = trainer.state_dict()
    status = 0
    if rank == 0:
        print(f"{args.steps} steps in {time.perf_counter() - t0:.2f} s", flush=True)
        if args.check:
            ref_model, ref_cfg = build(args.inner)
            ref = lwcompile.transform(ref_model, F.cross_entropy, x[: args.batch], ref_cfg)
            for xb, yb in batches(x, y, args.batch, args.steps):
                ref.step(xb, yb)
            worst = max(float((state[k] - v).abs().max() / v.abs().max().clamp_min(1e-300))
                        for k, v in ref_model.state_dict().items() if v.is_floating_point())
            ok = worst <= TOLERANCE
            print(f"one-process check: largest relative difference {worst:.2e} ({'ok' if ok else 'MISMATCH'})")
            status = 0 if ok else 1
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
