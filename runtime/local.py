"""Local runtime: run the blocks' inner-update graphs in one process.

Blocks assigned to the same device run one after another; different devices run concurrently in threads
(PyTorch releases the GIL inside kernels, and each CUDA device gets its own stream, ordered after the work that
produced the inputs). With no assignment everything runs in order on the tensors' own device, costing nothing
beyond the inner loops' arithmetic. Devices named "sim:N" (and "cpu") run on the tensors' own device: threads
that share the CPU, which is how a plan for N simulated devices is executed and measured.

A :class:`Runner` is the other way to run a step's jobs: any object with ``run_jobs(jobs) -> results``, passed as
``Program.step(..., runner=...)`` (the distributed runtime runs only its own blocks and exchanges the results).

Example:
    >>> import torch
    >>> jobs = {"a": (lambda x: (x + 1,), (torch.zeros(2),)), "b": (lambda x: (x * 2,), (torch.ones(2),))}
    >>> run_jobs(jobs)["a"][0]
    tensor([1., 1.])
    >>> run_jobs(jobs, {"sim:0": ["a"], "sim:1": ["b"]})["b"][0]
    tensor([2., 2.])
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch

from lwcompile.errors import ConfigError

Job = tuple[Callable[..., tuple[torch.Tensor, ...]], Sequence[torch.Tensor]]


@runtime_checkable
class Runner(Protocol):
    """Something that runs a step's jobs itself (e.g. across processes) and returns every job's results."""

    def run_jobs(self, jobs: Mapping[str, Job]) -> dict[str, tuple]: ...


def run_jobs(jobs: Mapping[str, Job], assignment: Mapping[str, Sequence[str]] | None = None) -> dict[str, tuple]:
    """Run every job; ``assignment`` maps a device name to the job names it runs, in order.

    Every job must be assigned exactly once. Results come back on each job's own device (that of its first argument).
    """
    if assignment is not None and not isinstance(assignment, Mapping):
        raise ConfigError(f"assignment must map device names to block names, got {type(assignment).__name__}; "
                          "pass a runner as Program.step(..., runner=...).")
    with torch.no_grad():
        if not assignment:
            return _run_device(None, list(jobs), jobs)
        groups = _check(jobs, assignment)
        check_runnable(assignment)  # before any job runs: a missing GPU must not fail half-way through a step
        if len(groups) == 1:
            (device, names), = groups.items()
            return _run_device(_real(device), names, jobs)
        results: dict[str, tuple] = {}
        with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="lwcompile-device") as pool:
            futures = [pool.submit(_run_no_grad, _real(d), names, jobs) for d, names in groups.items()]
            for f in futures:  # wait for all before raising, so no thread outlives the call
                f.exception()
            for f in futures:
                results.update(f.result())
        return results


def _check(jobs: Mapping[str, Job], assignment: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """The non-empty device groups; raises unless every job is assigned exactly once."""
    seen: dict[str, str] = {}
    for device, names in assignment.items():
        if isinstance(names, str):
            raise ConfigError(f"assignment[{device!r}] = {names!r}: expected a list of block names, not a string.")
        for n in names:
            if n not in jobs:
                raise ConfigError(f"assignment[{device!r}] names {n!r}, which is not a block of this program; "
                                  f"blocks are {list(jobs)[:8]}. Use prog.plan(...).assignment.")
            if n in seen:
                raise ConfigError(f"block {n!r} is assigned to both {seen[n]!r} and {device!r}; assign it once.")
            seen[n] = device
    missing = [n for n in jobs if n not in seen]
    if missing:
        raise ConfigError(f"the assignment leaves block(s) {missing[:8]} unassigned; every block needs a device "
                          "(use prog.plan(...).assignment).")
    return {d: list(names) for d, names in assignment.items() if names}


def check_runnable(devices: Sequence[str] | Mapping[str, Any]) -> None:
    """Raise ConfigError unless this process can run every named device ("sim:N" and "cpu" always can).

    Called by :func:`run_jobs` before any job and by ``make_plan`` before placing, so a plan for GPUs this machine
    lacks fails with the device's name instead of ``torch.cuda.Stream requires CUDA support`` mid-step.
    """
    for name in devices:
        if not isinstance(name, str):
            raise ConfigError(f"device {name!r} of type {type(name).__name__}: a device is a name such as 'cpu', "
                              "'cuda:0' or 'sim:0'.")
        if _real(name) is None:
            continue
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"device {name!r} is not a device torch knows ({e}); use 'cpu', 'cuda:N', or "
                              "'sim:N' / an int count for simulated devices.") from None
        backend = getattr(torch, dev.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
        if backend is None or not callable(getattr(backend, "is_available", None)):
            continue  # a device type torch has no availability query for (e.g. "meta"): torch reports misuse
        hint = " Use an int (devices=2) or 'sim:N' names for simulated devices that share this machine, or 'cpu'."
        if not backend.is_available():
            raise ConfigError(f"device {name!r}: {dev.type.upper()} is not available on this machine "
                              f"(torch.{dev.type}.is_available() is False).{hint}")
        count = getattr(backend, "device_count", None)
        n = count() if callable(count) else None
        if dev.index is not None and n is not None and dev.index >= n:
            have = ", ".join(f"{dev.type}:{i}" for i in range(n))
            raise ConfigError(f"device {name!r} does not exist: only {n} {dev.type.upper()} device(s) exist "
                              f"({have}).{hint}")


def _run_no_grad(device: str | None, names: Sequence[str], jobs: Mapping[str, Job]) -> dict[str, tuple]:
    with torch.no_grad():
        return _run_device(device, names, jobs)


def _run_device(device: str | None, names: Sequence[str], jobs: Mapping[str, Job]) -> dict[str, tuple]:
    """Run ``names`` in order on ``device`` (None: where their tensors are)."""
    out: dict[str, tuple] = {}
    dev = torch.device(device) if device is not None else None
    stream = None
    if dev is not None and dev.type == "cuda":
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))  # inputs made on the default stream come first
    with torch.cuda.stream(stream) if stream is not None else nullcontext():
        for name in names:
            fn, args = jobs[name]
            try:
                if dev is None:
                    out[name] = tuple(fn(*args))
                    continue
                home = _home(args)
                res = fn(*(_to(a, dev) for a in args))
                out[name] = tuple(r.to(home) if isinstance(r, torch.Tensor) else r for r in res)
            except Exception as e:
                e.add_note(f"(while running the inner loop of block {name!r}" + (f" on {device})" if device else ")"))
                raise
    if stream is not None:
        stream.synchronize()
    return out


def _home(args: Sequence[Any]) -> torch.device | None:
    return next((a.device for a in args if isinstance(a, torch.Tensor)), None)


def _to(a: Any, dev: torch.device) -> Any:
    return a.to(dev, non_blocking=True) if isinstance(a, torch.Tensor) else a


def _real(device: str) -> str | None:
    """The torch device a plan's device name runs on; None for simulated devices and the CPU (run in place)."""
    return None if device.startswith("sim:") or device == "cpu" else device
