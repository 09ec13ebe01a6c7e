"""Cost model of one block's inner phase: FLOPs, bytes, and predicted (or measured) seconds.

Pure functions on :class:`lwcompile.ir.Block` records; nothing here runs a model. The only side effect is
:func:`measure_device_rate`, which times a matmul once per device (with its own RNG) and caches the answer.
"""
from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lwcompile.errors import ConfigError
from lwcompile.ir import Block


@dataclass(frozen=True)
class BlockCost:
    """What placing one block costs.

    flops:   FLOPs of the block's `steps` inner iterations.
    memory:  bytes the owner holds: parameters × (1 + optimizer state slots) + one batch of input and target.
    seconds: predicted inner-phase time (flops / device_rate), or the measured time when a profile names the block.
    measured: True when `seconds` came from a profile.
    """

    name: str
    flops: int
    memory: int
    seconds: float
    measured: bool = False


_clock = time.perf_counter  # the timer measure_device_rate reads (a test replaces it to check the statistic)


@functools.lru_cache(maxsize=None)
def measure_device_rate(device: str = "cpu", size: int = 512, repeats: int = 9) -> float:
    """FLOP/s of a float32 `size`×`size` matmul on `device`: the median of `repeats` timings, measured once per
    process and argument set (cached; ``measure_device_rate.cache_clear()`` measures again).

    A rough, single-number speed: good enough to turn FLOPs into comparable seconds, which is all placement
    needs (only ratios between blocks matter for the assignment; the absolute value only scales the table).
    The median of a ~0.27 GFLOP matmul, unlike the best (or only) time of a small one, is not swayed by one
    lucky or one preempted run. The operands come from a private, fixed-seed ``torch.Generator``: planning never
    draws from (or reseeds) the global RNG, so dropout masks and the user's random streams do not depend on
    whether a plan was made.

    Example:
        >>> rate = measure_device_rate()
        >>> rate > 0
        True
    """
    import torch  # imported here so that planning from a stored profile never needs torch

    _check_int("size", size, minimum=1)
    _check_int("repeats", repeats, minimum=1)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=gen)
    b = torch.randn(size, size, device=device, generator=gen)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    with torch.no_grad():
        a @ b  # warm-up: the first call pays for allocation and kernel selection
        sync()
        times = []
        for _ in range(repeats):
            t0 = _clock()
            a @ b
            sync()
            times.append(_clock() - t0)
    return 2.0 * size**3 / max(statistics.median(times), 1e-9)


def block_cost(block: Block, steps: int, optimizer_slots: int = 0, device_rate: float = 1e9) -> BlockCost:
    """Estimated cost of `steps` inner iterations of `block` on a device doing `device_rate` FLOP/s.

    `optimizer_slots` is the number of parameter-sized state tensors the inner optimizer keeps
    (gd 0, momentum 1, rmsprop 1, adam 2).

    Example:
        >>> from lwcompile.ir import Block
        >>> b = Block("fc", "fc", "linear", (), "relu", (), "fc.weight", None, (4, 8), None, (2, 8), (2, 4), 64)
        >>> c = block_cost(b, steps=10, optimizer_slots=2, device_rate=1e6)
        >>> (c.flops, c.memory, c.seconds)
        (2560, 480, 0.00256)
    """
    _check_int("steps", steps, minimum=1)
    _check_int("optimizer_slots", optimizer_slots, minimum=0)
    _check_rate(device_rate)
    flops = block.inner_flops(steps)
    memory = block.param_bytes * (1 + optimizer_slots) + block.activation_bytes
    return BlockCost(block.name, flops, memory, flops / device_rate)


def block_costs(
    blocks: Sequence[Block],
    steps: int,
    optimizer_slots: int = 0,
    device_rate: float | None = None,
    profile: Mapping[str, float] | None = None,
) -> dict[str, BlockCost]:
    """Cost of every block, keyed by name, in block order. A `profile` (name -> measured seconds) replaces the
    estimate for the blocks it names; `device_rate=None` measures the CPU once per process (see
    :func:`measure_device_rate`).

    Example:
        >>> from lwcompile.ir import Block
        >>> b = Block("fc", "fc", "linear", (), "relu", (), "fc.weight", None, (4, 8), None, (2, 8), (2, 4), 64)
        >>> block_costs([b], steps=10, device_rate=1e6, profile={"fc": 0.5})["fc"].seconds
        0.5
    """
    rate = measure_device_rate() if device_rate is None else device_rate
    costs = {b.name: block_cost(b, steps, optimizer_slots, rate) for b in blocks}
    for name, seconds in (profile or {}).items():
        if name not in costs:
            raise ConfigError(f"profile names block {name!r}, which is not one of the blocks {_few(costs)}; "
                              f"key the profile by Block.name.")
        if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
            raise ConfigError(f"profile[{name!r}]={seconds!r}: a measured time must be a finite number of seconds >= 0.")
        c = costs[name]
        costs[name] = BlockCost(c.name, c.flops, c.memory, float(seconds), measured=True)
    return costs


def _check_int(field: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{field}={value!r}: expected an integer >= {minimum}.")


def _check_rate(rate: object) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
        raise ConfigError(f"device_rate={rate!r}: expected a positive number of FLOP/s (or None to measure it).")


def _few(names: Mapping[str, object] | Sequence[str], k: int = 5) -> str:
    """A short list of names for an error message."""
    names = list(names)
    more = f" and {len(names) - k} more" if len(names) > k else ""
    return "[" + ", ".join(repr(n) for n in names[:k]) + "]" + more
