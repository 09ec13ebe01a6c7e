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
from lwcompile.ir import Block, numel


@dataclass(frozen=True)
class BlockCost:
    """What placing one block costs.

    flops:   FLOPs of the block's `steps` inner iterations (or of its one exact solve).
    memory:  bytes the owner holds: parameters × (1 + optimizer state slots) + one batch of input and target
             (+ the Gram matrices of an exact solve).
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


def block_cost(block: Block, steps: int, optimizer_slots: int = 0, device_rate: float = 1e9,
               exact: bool = False) -> BlockCost:
    """Estimated cost of `steps` inner iterations of `block` on a device doing `device_rate` FLOP/s.

    `optimizer_slots` is the number of parameter-sized state tensors the inner optimizer keeps
    (gd 0, momentum 1, rmsprop 1, adam 2). ``exact=True`` costs ``inner_optimizer="exact"``'s one closed-form
    solve instead (:func:`exact_flops`; `steps` is then unused).

    Example:
        >>> from lwcompile.ir import Block
        >>> b = Block("fc", "fc", "linear", (), "relu", (), "fc.weight", None, (4, 8), None, (2, 8), (2, 4), 64)
        >>> c = block_cost(b, steps=10, optimizer_slots=2, device_rate=1e6)
        >>> (c.flops, c.memory, c.seconds)
        (2560, 480, 0.00256)
        >>> block_cost(b, steps=10, device_rate=1e6, exact=True).flops
        1194
    """
    _check_int("steps", steps, minimum=1)
    _check_int("optimizer_slots", optimizer_slots, minimum=0)
    _check_rate(device_rate)
    flops = exact_flops(block) if exact else block.inner_flops(steps)
    memory = block.param_bytes * (1 + optimizer_slots) + block.activation_bytes
    if exact:
        groups, _, d, out = exact_problem(block)
        memory += groups * d * (d + out) * block.dtype_bytes
    return BlockCost(block.name, flops, memory, flops / device_rate)


def exact_problem(block: Block, batch: int | None = None) -> tuple[int, int, int, int]:
    """(groups, rows, unknowns D, outputs O) of the least-squares problem(s) an exact inner solve of `block`
    factors: one per conv group, D input features per output (+ 1 for a trainable bias), rows = batch × output
    positions.

    Example:
        >>> from lwcompile.ir import Block
        >>> b = Block("c", "c", "conv2d", (("dilation", (1, 1)), ("groups", 2), ("padding", (1, 1)),
        ...           ("stride", (1, 1))), "relu", (), "c.weight", "c.bias", (6, 2, 3, 3), (6,), (5, 4, 8, 8),
        ...           (5, 6, 8, 8), 0)
        >>> exact_problem(b)
        (2, 320, 19, 3)
    """
    b = block.batch if batch is None else batch
    bias = int(block.bias is not None and block.bias not in block.frozen)
    if block.op in ("linear", "matmul", "addmm"):
        out = block.weight_shape[0] if block.op == "linear" else block.weight_shape[-1]
        return 1, b * numel(block.output_shape[1:-1]), int(block.input_shape[-1]) + bias, int(out)
    groups = int(dict(block.attrs).get("groups", 1))
    return (groups, b * numel(block.output_shape[2:]), numel(block.weight_shape[1:]) + bias,
            int(block.weight_shape[0]) // groups)


def exact_flops(block: Block, batch: int | None = None, preact_given: bool = False) -> int:
    """FLOPs of one exact inner solve: Gram XᵀX, current pre-activation XWᵀ (not with ``preact_given``: the
    forward pass's is handed in), right-hand side XᵀR, Cholesky (D³/3) and its two triangular solves, summed
    over groups.

    Example:
        >>> from lwcompile.ir import Block
        >>> b = Block("fc", "fc", "linear", (), "tanh", (), "fc.weight", None, (4, 8), None, (2, 8), (2, 4), 64)
        >>> exact_flops(b)  # 2·2·8² + 2·(2·2·8·4) + ⌊8³/3⌋ + 2·8²·4  (batch 2, 8 inputs, 4 outputs, no bias)
        1194
    """
    groups, rows, d, out = exact_problem(block, batch)
    products = 1 if preact_given else 2  # XᵀR, and XWᵀ unless given
    return groups * (2 * rows * d * d + products * (2 * rows * d * out) + d ** 3 // 3 + 2 * d * d * out)


def block_costs(
    blocks: Sequence[Block],
    steps: int,
    optimizer_slots: int = 0,
    device_rate: float | None = None,
    profile: Mapping[str, float] | None = None,
    exact: bool = False,
) -> dict[str, BlockCost]:
    """Cost of every block, keyed by name, in block order. A `profile` (name -> measured seconds) replaces the
    estimate for the blocks it names; `device_rate=None` measures the CPU once per process (see
    :func:`measure_device_rate`); ``exact=True`` for ``inner_optimizer="exact"``.

    Example:
        >>> from lwcompile.ir import Block, numel
        >>> b = Block("fc", "fc", "linear", (), "relu", (), "fc.weight", None, (4, 8), None, (2, 8), (2, 4), 64)
        >>> block_costs([b], steps=10, device_rate=1e6, profile={"fc": 0.5})["fc"].seconds
        0.5
    """
    rate = measure_device_rate() if device_rate is None else device_rate
    costs = {b.name: block_cost(b, steps, optimizer_slots, rate, exact) for b in blocks}
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
