"""Local runtime: run the blocks' inner-update graphs in one process.

Blocks assigned to the same device run one after another; different devices run concurrently in threads
(PyTorch releases the GIL inside kernels, and each CUDA device gets its own stream). With no assignment
everything runs in order on the tensors' own device, costing nothing beyond the inner loops' arithmetic.

Example:
    >>> import torch
    >>> jobs = {"a": (lambda x: (x + 1,), (torch.zeros(2),))}
    >>> run_jobs(jobs)["a"][0]
    tensor([1., 1.])
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping, Sequence

import torch

Job = tuple[Callable[..., tuple[torch.Tensor, ...]], Sequence[torch.Tensor]]


def _run_device(device: str | None, names: Sequence[str], jobs: Mapping[str, Job]) -> dict[str, tuple]:
    out = {}
    if device is None:
        for name in names:
            fn, args = jobs[name]
            out[name] = tuple(fn(*args))
        return out
    dev = torch.device(device)
    stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
    ctx = torch.cuda.stream(stream) if stream is not None else _null()
    with ctx:
        for name in names:
            fn, args = jobs[name]
            home = args[0].device
            res = fn(*(a.to(dev, non_blocking=True) for a in args))
            out[name] = tuple(r.to(home) for r in res)
    if stream is not None:
        stream.synchronize()
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_jobs(jobs: Mapping[str, Job], assignment: Mapping[str, Sequence[str]] | None = None) -> dict[str, tuple]:
    """Run every job; ``assignment`` maps a device name to the job names it runs, in order.

    Devices named "sim:N" are simulated (one thread each, on the tensors' own device).
    """
    with torch.no_grad():
        if not assignment or len(assignment) == 1:
            names = list(jobs) if not assignment else list(next(iter(assignment.values())))
            dev = None if not assignment else _real(next(iter(assignment)))
            return _run_device(dev, names, jobs)
        results: dict[str, tuple] = {}
        with ThreadPoolExecutor(max_workers=len(assignment)) as pool:
            futs = [pool.submit(_run_no_grad, _real(d), list(n), jobs) for d, n in assignment.items()]
            for f in futs:
                results.update(f.result())
        return results


def _run_no_grad(device, names, jobs):
    with torch.no_grad():
        return _run_device(device, names, jobs)


def _real(device: str) -> str | None:
    return None if device.startswith("sim:") or device == "cpu" else device
