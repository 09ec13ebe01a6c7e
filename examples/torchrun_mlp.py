"""Train an MLP classifier on scikit-learn's 8x8 digits with one process per device.

    torchrun --nproc-per-node 2 examples/torchrun_mlp.py --mode replicated
    torchrun --nproc-per-node 2 examples/torchrun_mlp.py --mode partitioned --check

Every rank builds the same model (same seed) and plan and feeds the same batches; rank 0 prints. Replicated mode
runs each block's inner loop on one rank and broadcasts the new weights; partitioned mode gives each rank a stage
of the network and passes activations and their gradients between ranks. ``--check`` trains the same model in
one process afterwards and prints the largest relative difference (float rounding only).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import lwcompile
from lwcompile.experiments.data import load_digits_images, load_digits_labels
from lwcompile.runtime.distributed import DistributedTrainer, init_from_env


def build(seed: int = 0) -> tuple[nn.Module, lwcompile.Config]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 128),
                          nn.ReLU(), nn.Linear(128, 10))
    cfg = lwcompile.Config(target="md_post", local_loss="matching", gamma=1.0, steps=10, inner_optimizer="adam",
                           inner_lr=1e-3, outer_optimizer="adam", outer_lr=1e-3)
    return model, cfg


def batches(x: torch.Tensor, y: torch.Tensor, size: int, steps: int, seed: int = 0):
    """The same batches on every rank: a seeded permutation per epoch, full batches only."""
    g = torch.Generator().manual_seed(seed)
    per_epoch = len(x) // size
    order = torch.randperm(len(x), generator=g)
    for k in range(steps):
        if k and k % per_epoch == 0:
            order = torch.randperm(len(x), generator=g)
        i = order[(k % per_epoch) * size:(k % per_epoch + 1) * size]
        yield x[i], y[i]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("replicated", "partitioned"), default="replicated")
    ap.add_argument("--steps", type=int, default=60, help="training steps (batches)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for another rank before failing")
    ap.add_argument("--check", action="store_true", help="compare with a one-process run at the end (rank 0)")
    args = ap.parse_args()

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))  # processes share this machine's cores
    init_from_env(backend="gloo", timeout=args.timeout)
    rank, world = dist.get_rank(), dist.get_world_size()

    x, y = load_digits_images("train"), load_digits_labels("train")
    x_test, y_test = load_digits_images("test"), load_digits_labels("test")
    model, cfg = build()
    prog = lwcompile.transform(model, F.cross_entropy, x[: args.batch], cfg)
    plan = prog.plan(devices=world, mode=args.mode)
    trainer = DistributedTrainer(prog, plan, timeout=args.timeout)
    if rank == 0:
        print(plan, flush=True)
    t0 = time.perf_counter()
    for k, (xb, yb) in enumerate(batches(x, y, args.batch, args.steps)):
        loss = trainer.step(xb, yb)
        if rank == 0 and (k % 10 == 0 or k == args.steps - 1):
            t = trainer.last_timings
            print(f"step {k:4d}  loss {loss:.4f}  inner {1e3 * t['inner']:.1f} ms  step {1e3 * t['total']:.1f} ms",
                  flush=True)
    elapsed = time.perf_counter() - t0
    state = trainer.state_dict()  # the whole model on every rank (partitioned: gathered from the stages)
    if rank == 0:
        with torch.no_grad():
            acc = (prog.model(x_test).argmax(1) == y_test).float().mean().item()
        print(f"{args.steps} steps in {elapsed:.2f} s on {world} ranks ({args.mode}); test accuracy {acc:.3f}")
        if args.check:
            ref_model, ref_cfg = build()
            ref = lwcompile.transform(ref_model, F.cross_entropy, x[: args.batch], ref_cfg)
            for xb, yb in batches(x, y, args.batch, args.steps):
                ref.step(xb, yb)
            worst = max(float((state[k] - v).abs().max() / v.abs().max().clamp_min(1e-12))
                        for k, v in ref_model.state_dict().items() if v.is_floating_point())
            print(f"one-process check: largest relative difference {worst:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
