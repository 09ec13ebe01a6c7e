"""Data-parallel LocoProp on the MNIST MLP 784-512-512-10: bytes all-reduced and time per step, 1 vs 2 ranks.

    python benchmarks/data_parallel.py            # batch 256, 6 timed steps per row (about a minute)
    python benchmarks/data_parallel.py --quick    # batch 64, 2 timed steps: a smoke run

For LocoProp-M (rmsprop_tf1, T = 10) and LocoProp-S (the exact solve) it prints and writes to
docs/results/data_parallel/results.md:

* bytes per step: predicted by ``allreduce_bytes`` (iterative: T × weights; exact: Σ D² + D·O + D + O + 1 per
  block; plus the non-block gradients), counted by the trainer (``trainer.last_bytes``), and DDP's (the weights
  once);
* the median step time of one process (``prog.step``) and of 2 gloo processes (``DataParallelTrainer``), each
  with one torch thread, on random inputs (timing does not depend on the data), and the cost model's prediction
  for the same (``lwcompile.runtime.dp_costs``, this CPU's measured matmul rate);
* the cost model's predicted scaling for many GPUs (strong: global batch 256; weak: 256 per rank).

The machine's load average is printed: other processes skew every number.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import lwcompile
from lwcompile.experiments.workloads import mnist_mlp
from lwcompile.runtime.costs import measure_device_rate
from lwcompile.runtime.dp_costs import predict_scaling, scaling_table

RECIPES = {
    "LocoProp-M (rmsprop_tf1, T=10)": dict(target="md_post", local_loss="matching", gamma=10.0, steps=10,
                                          inner_optimizer="rmsprop_tf1", inner_lr=1e-5, outer_optimizer="adam"),
    "LocoProp-S (exact)": dict(target="gd_pre", local_loss="squared_pre", gamma=1.0, inner_optimizer="exact",
                               prox=1.0, outer_optimizer="adam"),
}
OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "data_parallel" / "results.md"


def build(recipe: str, batch: int):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)
    return lwcompile.transform(mnist_mlp(seed=0), F.cross_entropy, x, lwcompile.Config(**RECIPES[recipe])), x, y


def time_one_process(recipe: str, batch: int, steps: int) -> float:
    prog, x, y = build(recipe, batch)
    prog.step(x, y)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        prog.step(x, y)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rank_main(rank: int, port: int, recipe: str, batch: int, steps: int, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        from lwcompile.runtime.data_parallel import DataParallelTrainer

        prog, x, y = build(recipe, batch)
        trainer = DataParallelTrainer(prog, timeout=120)
        mine = trainer.shard((x, y))
        trainer.step(*mine)
        times = []
        for _ in range(steps):
            trainer.step(*mine)
            times.append(trainer.last_timings["total"])
        results.put((rank, "ok", statistics.median(times), dict(trainer.last_bytes)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, "err", traceback.format_exc(), None))


def time_two_ranks(recipe: str, batch: int, steps: int) -> tuple[float, dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("forkserver")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, port, recipe, batch, steps, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    bad = [g for g in got if g[1] != "ok"]
    if bad:
        raise RuntimeError(f"rank {bad[0][0]} failed:\n{bad[0][2]}")
    rank0 = next(g for g in got if g[0] == 0)
    return max(g[2] for g in got), rank0[3]


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    batch, steps = (64, 2) if args.quick else (256, 6)
    torch.set_num_threads(1)
    rate = measure_device_rate()
    load = os.getloadavg()[0]
    lines = [f"# Data-parallel LocoProp: MNIST MLP 784-512-512-10, global batch {batch}, float32",
             "", f"Command: `python benchmarks/data_parallel.py{' --quick' if args.quick else ''}`; "
             f"{os.cpu_count()} cores, load average {load:.1f} at the start; one torch thread per process; "
             f"cost model at this CPU's measured {rate / 1e9:.1f} GFLOP/s, loopback all-reduce modelled at "
             "1 GB/s and 50 µs.", "",
             "| recipe | bytes/step predicted | counted (rank 0) | DDP (weights once) | 1 process ms | "
             "2 gloo ranks ms | 2 vs 1 | model 1 → 2 ranks ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    gpu = []
    for recipe in RECIPES:
        from lwcompile.runtime.data_parallel import allreduce_bytes

        prog, _, _ = build(recipe, batch)
        predicted = allreduce_bytes(prog)["total"]
        ddp = sum(p.numel() * p.element_size() for p in prog.model.parameters())
        one = time_one_process(recipe, batch, steps)
        two, counted = time_two_ranks(recipe, batch, steps)
        model = predict_scaling(prog, (1, 2), device_rate=rate, link=1e9, latency=5e-5)
        lines.append(f"| {recipe} | {predicted:,} | {counted['nonblock'] + counted['blocks']:,} | {ddp:,} | "
                     f"{1e3 * one:.1f} | {1e3 * two:.1f} | {one / two:.2f}× | "
                     f"{1e3 * model[0]['total_s']:.1f} → {1e3 * model[1]['total_s']:.1f} |")
        print(lines[-1], flush=True)
        gpu += ["", f"**{recipe}**, predicted for GPUs (20 TFLOP/s each, 100 GB/s links, 10 µs per all-reduce "
                    "hop), strong scaling (global batch 256):", "",
                scaling_table(predict_scaling(prog, (1, 2, 8, 64), 2e13, 1e11, 1e-5, batch=256)), "",
                "weak scaling (256 rows per rank):", "",
                scaling_table(predict_scaling(prog, (1, 2, 8, 64), 2e13, 1e11, 1e-5, per_rank_batch=256))]
    notes = ["", "Reading it: the counted bytes are what the trainer passed to all-reduce (rank 0; not included: the "
             "example count and loss, 16 bytes once, and an 8-byte failure flag per all-reduce) and equal the "
             "prediction. On 2 shared cores two processes cannot beat one: each gets one core at best, the machine runs other jobs (load "
             "above), and every all-reduce crosses loopback through gloo. The exact solve pays most: the data-"
             "parallel form factors the D×D Gram system (784² for the first layer) after an all-reduce of it, where "
             "one process at batch ≤ D solves the cheaper rows×rows dual system, which has no shard-wise sum. The "
             "cost model's CPU rate is one timed 512×512 matmul, noisy under load; it under-predicts the measured "
             "step here. The GPU rows are the model only (not measured): for this small MLP, per-all-reduce latency "
             "dominates, so strong scaling loses and only weak scaling (more data per step) gains; T all-reduces "
             "per step make the iterative recipe scale worse than the exact one, and both move more bytes than DDP."]
    text = "\n".join(lines + notes + gpu) + "\n"
    print("\n".join(gpu))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return text


if __name__ == "__main__":
    main()
