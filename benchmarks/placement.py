"""Predicted vs measured inner-phase time of one training step, for 1 and 2 workers.

    python benchmarks/placement.py                 # MNIST autoencoder + deep MLP, batch 1000, T = 10
    python benchmarks/placement.py --quick         # batch 100, 2 timed steps: a smoke run

For each model it prints one row per way of running the inner loops:

* 1 worker, 1 thread and 1 worker, all threads: ``prog.step(x, y)`` (the baseline a user gets);
* 2 workers as threads: ``prog.step(x, y, assignment=plan.assignment)`` with 1 torch thread (the two threads share
  the cores; the GIL is released inside kernels);
* 2 gloo processes, replicated and partitioned: :class:`DistributedTrainer`, 1 torch thread per process.

"predicted" is the plan's makespan from the FLOP cost model (device rate measured with one thread) and, in
brackets, from a profile of each block's inner loop measured alone. "measured" is the median inner-phase time:
for processes, the slowest rank's own inner loops (the exchange after it is shown separately). "speed-up" is
against 1 worker with 1 thread; "ideal" is total work / makespan of the profiled plan. Inputs are random (timing
does not depend on the data). The machine's load average is printed: other processes skew every number.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import traceback
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import lwcompile
from lwcompile.experiments.models import AUTOENCODER_SIZES, deep_autoencoder, mlp, sigmoid_xent_sum
from lwcompile.runtime.costs import measure_device_rate

MLP_SIZES = (784, 512, 512, 512, 512, 512, 512, 512, 512, 10)


def build(name: str, batch: int, seed: int = 0):
    """(program, batch x, batch y) for "autoencoder" (the paper's LocoProp-M setup) or "mlp" (8 ReLU layers)."""
    g = torch.Generator().manual_seed(seed)
    cfg = lwcompile.Config(steps=10, inner_optimizer="rmsprop_tf1", inner_lr=1e-5, outer_optimizer="adam")
    if name == "autoencoder":
        model, loss = deep_autoencoder(AUTOENCODER_SIZES, seed=seed), sigmoid_xent_sum
        x = torch.rand(batch, 784, generator=g)
        y = x
    else:
        model, loss = mlp(MLP_SIZES, act="relu", seed=seed), F.cross_entropy
        x = torch.rand(batch, 784, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
    return lwcompile.transform(model, loss, x, cfg), x, y


def time_local(prog, x, y, steps: int, threads: int, assignment=None) -> float:
    """Median inner-phase seconds of ``prog.step`` (after one warm-up step)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        prog.step(x, y, assignment=assignment)
        times = []
        for _ in range(steps):
            prog.step(x, y, assignment=assignment)
            times.append(prog.last_timings["inner"])
    finally:
        torch.set_num_threads(old)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------- processes
def _rank_main(rank: int, port: int, name: str, batch: int, mode: str, steps: int, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        from lwcompile.runtime.distributed import DistributedTrainer

        prog, x, y = build(name, batch)
        trainer = DistributedTrainer(prog, prog.plan(devices=2, mode=mode, device_rate=1e9), timeout=300)
        trainer.step(x, y)
        inner, total = [], []
        for _ in range(steps):
            trainer.step(x, y)
            t = trainer.last_timings
            inner.append(t["inner_own"] if mode == "replicated" else t["inner"])  # this rank's own inner loops
            total.append(t["total"])
        results.put((rank, [statistics.median(inner), statistics.median(total)]))
    except Exception:  # noqa: BLE001 - reported by the parent
        results.put((rank, traceback.format_exc()))
    results.close()
    results.join_thread()


def time_processes(name: str, batch: int, mode: str, steps: int) -> tuple[float, float]:
    """(slowest rank's own inner loops, the step), median seconds, with 2 gloo processes."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "lwcompile"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, port, name, batch, mode, steps, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=900) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    bad = [v for v in got.values() if isinstance(v, str)]
    if bad:
        raise RuntimeError("a rank failed:\n" + bad[0])
    return max(v[0] for v in got.values()), max(v[1] for v in got.values())


# ---------------------------------------------------------------------------------------------------- main
def bench(name: str, batch: int, steps: int, processes: bool) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    rate = measure_device_rate("cpu", size=512)  # one thread: what each worker gets
    prog, x, y = build(name, batch)
    prog.step(x, y)  # builds the graphs
    prof = prog.profile(x, y, repeats=2)
    rows = []

    def row(workers, how, threads, mode, measured, extra=""):
        pred = prog.plan(devices=workers, mode=mode, device_rate=rate).makespan
        pred_prof = prog.plan(devices=workers, mode=mode, profile=prof).makespan
        rows.append(dict(model=name, workers=workers, how=how, threads=threads, predicted=pred,
                         profiled=pred_prof, measured=measured, extra=extra))

    cores = os.cpu_count() or 1
    row(1, "one process", 1, "replicated", time_local(prog, x, y, steps, threads=1))
    row(1, "one process", cores, "replicated", time_local(prog, x, y, steps, threads=cores))
    rows[-1]["extra"] = f"whole step {prog.last_timings['total'] * 1e3:.0f} ms"
    for mode in ("replicated", "partitioned"):
        plan = prog.plan(devices=2, mode=mode, profile=prof)
        row(2, f"threads, {mode} plan", 1, mode, time_local(prog, x, y, steps, threads=1, assignment=plan.assignment))
    if processes:
        for mode in ("replicated", "partitioned"):
            inner, total = time_processes(name, batch, mode, steps)
            row(2, f"gloo, {mode}", 1, mode, inner, f"whole step {total * 1e3:.0f} ms")
    base = rows[0]["measured"]
    ideal = sum(prof.values())
    for r in rows:
        r["speedup"] = base / r["measured"]
        r["ideal"] = ideal / r["profiled"]
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    head = ("model", "workers", "how", "threads", "predicted (profiled)", "measured", "speed-up", "ideal", "note")
    table = [head] + [(r["model"], str(r["workers"]), r["how"], str(r["threads"]),
                       f"{r['predicted'] * 1e3:.0f} ms ({r['profiled'] * 1e3:.0f} ms)", f"{r['measured'] * 1e3:.0f} ms",
                       f"{r['speedup']:.2f}x", f"{r['ideal']:.2f}x", r["extra"]) for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    for i, t in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["autoencoder", "mlp"], choices=["autoencoder", "mlp"])
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per measurement (after one warm-up)")
    ap.add_argument("--no-processes", action="store_true", help="skip the 2-process gloo runs")
    ap.add_argument("--quick", action="store_true", help="batch 100, 2 timed steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.steps = 100, 2
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, load average {load[0]:.2f} at start; "
          f"batch {args.batch}, T = 10, median of {args.steps} steps")
    rows = [r for m in args.models for r in bench(m, args.batch, args.steps, not args.no_processes)]
    print_rows(rows)


if __name__ == "__main__":
    main()
