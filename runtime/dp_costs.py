"""Predicted time of one data-parallel step on N ranks, from :mod:`lwcompile.runtime.costs`' FLOP model.

Per rank, with B/N rows of a global batch of B:

* forward + backward of the task loss: 6 · rows · (weights) FLOPs (2 forward, 4 backward), split N ways;
* inner loops (:func:`~lwcompile.runtime.costs.block_costs`): an iterative optimizer's 2T·rows·D·O products split
  N ways; the exact solve's Gram and right-hand side (2·rows·D² + 2·rows·D·O ×2) split N ways, but its
  Cholesky and solves (D³/3 + 2D²·O) run whole on every rank: the part that does not scale;
* communication: a ring all-reduce of S bytes costs 2(N−1)·α + 2(N−1)/N · S/β (α latency, β link bytes/s), with
  one all-reduce per step for the non-block gradients plus one per inner iteration (iterative) or one (exact),
  S from :func:`allreduce_bytes` (what ``DataParallelTrainer.last_bytes`` counts); DDP sends the weights once.

Nothing overlaps compute and communication here (the runtime does not either), so it is an upper bound.

Example:
    >>> import torch, lwcompile
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> prog = lwcompile.transform(m, torch.nn.functional.cross_entropy, torch.zeros(64, 8),
    ...                            lwcompile.Config(steps=2))
    >>> rows = predict_scaling(prog, ranks=(1, 2), device_rate=1e9, link=1e9, latency=1e-5)
    >>> rows[0]["comm_s"], rows[1]["comm_s"] > 0
    (0.0, True)
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lwcompile.runtime.costs import exact_problem


def allreduce_bytes(prog: Any, blocks: Sequence[str] | None = None) -> dict[str, int]:
    """Bytes each rank all-reduces per step: the non-block gradients once, plus per block T × its weights
    (iterative) or its solve's sums Σ_g (D² + D·O + D + O) + 1 (exact). Keys: "nonblock", "blocks", "total".
    ``blocks``: only these blocks' (a hybrid rank's own; default all). DDP would send the weights once.

    Example:
        >>> import torch, lwcompile
        >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> allreduce_bytes(lwcompile.transform(m, torch.nn.functional.mse_loss, torch.randn(5, 3),
        ...                 lwcompile.Config(steps=2)))["blocks"]
        208
    """
    gm = prog.trace_result.graph_module
    nonblock = sum(gm.get_parameter(n).numel() * gm.get_parameter(n).element_size() for n in prog.nonblock)
    names = None if blocks is None else set(blocks)
    blocks = 0
    for b in prog.blocks:
        if names is not None and b.name not in names:
            continue
        size = gm.get_parameter(b.weight).element_size()
        if prog.config.inner_optimizer == "exact":
            groups, _, d, o = exact_problem(b)
            d -= b.bias is not None and b.bias not in b.frozen  # the bias column is eliminated, not in the Gram
            blocks += (groups * (d * d + d * o + d + o) + 1) * size
        else:
            blocks += prog.config.steps * sum(gm.get_parameter(p).numel() for p in b.params) * size
    return {"nonblock": nonblock, "blocks": blocks, "total": nonblock + blocks}


def predict_scaling(prog: Any, ranks: Sequence[int] = (1, 2, 8, 64), device_rate: float = 1e12,
                    link: float = 1e11, latency: float = 1e-5, batch: int | None = None,
                    per_rank_batch: int | None = None) -> list[dict[str, Any]]:
    """One row per rank count: compute, communication and total seconds per step, speed-up over 1 rank (per
    example: a weak-scaling row's step does N times the work), and DDP's communication for the same model (weights
    once). ``batch``: the global batch (default: the program's); ``per_rank_batch``: weak scaling, B = it × N."""
    cfg = prog.config
    blocks = prog.blocks
    B0 = int(batch if batch is not None else blocks[0].batch)
    gm = prog.trace_result.graph_module
    weights = sum(p.numel() for p in gm.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in gm.parameters())
    moved = allreduce_bytes(prog)["total"]
    reduces = 1 + (1 if cfg.inner_optimizer == "exact" else cfg.steps)
    rows = []
    for n in ranks:
        B = per_rank_batch * n if per_rank_batch else B0
        share = B / n
        flops = 6 * share * weights
        for b in blocks:
            if cfg.inner_optimizer == "exact":
                g, r, d, o = exact_problem(b, B)
                r = r * share / B
                flops += g * (2 * r * d * d + 2 * (2 * r * d * o) + d ** 3 / 3 + 2 * d * d * o)
            else:
                flops += b.inner_flops(cfg.steps) * share / b.batch
        comm = 0.0 if n == 1 else reduces * 2 * (n - 1) * latency + 2 * (n - 1) / n * moved / link
        ddp = 0.0 if n == 1 else 2 * (n - 1) * latency + 2 * (n - 1) / n * weight_bytes / link
        rows.append({"ranks": n, "batch": B, "compute_s": flops / device_rate, "comm_s": comm,
                     "total_s": flops / device_rate + comm, "ddp_comm_s": ddp, "bytes": moved if n > 1 else 0})
    for row in rows:  # examples per second against one rank's
        row["speedup"] = (row["batch"] / row["total_s"]) / (rows[0]["batch"] / rows[0]["total_s"])
    return rows


def scaling_table(rows: list[dict[str, Any]]) -> str:
    """:func:`predict_scaling`'s rows as a Markdown table."""
    out = ["| ranks | global batch | compute ms | all-reduce ms | step ms | speed-up | DDP all-reduce ms |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['ranks']} | {r['batch']} | {1e3 * r['compute_s']:.3f} | {1e3 * r['comm_s']:.3f} | "
                   f"{1e3 * r['total_s']:.3f} | {r['speedup']:.2f}× | {1e3 * r['ddp_comm_s']:.3f} |")
    return "\n".join(out)


__all__ = ["allreduce_bytes", "predict_scaling", "scaling_table"]
