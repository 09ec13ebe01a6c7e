"""Measured inner-loop times per block, for placement (``prog.plan(profile=...)``).

Example:
    >>> import torch, lwcompile
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> prog = lwcompile.transform(m, torch.nn.functional.mse_loss, torch.zeros(8, 3))
    >>> sorted(profile_blocks(prog, torch.randn(8, 3), torch.randn(8, 2), repeats=1))
    ['0', '2']
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from lwcompile.passes.state import preserved_state

if TYPE_CHECKING:
    from lwcompile.program import Program


def profile_blocks(prog: Program, x: Any, y: Any, repeats: int = 3) -> dict[str, float]:
    """Block name -> seconds of its inner loop on this batch (median of ``repeats``); nothing in the model changes."""
    with preserved_state(prog.model):  # the forward would move BatchNorm statistics
        res = prog.compute_targets(x, y)
    jobs = prog.inner_jobs(res["inputs"], res["targets"], preacts=res["preacts"], offsets=res["offsets"])
    out = {}
    with torch.no_grad():
        for name, (fn, args) in jobs.items():
            fn(*args)  # warm-up
            times = []
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                fn(*args)
                times.append(time.perf_counter() - t0)
            out[name] = sorted(times)[len(times) // 2]
    return out
