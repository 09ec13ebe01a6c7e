"""The inner learning rate's schedule over training: warm-up, then annealing, from :class:`~lwcompile.Config`.

A Program passes ``prog.inner_lr × schedule_factor(config, prog.step_count)`` to its inner graphs (their learning
rate is an input, so a schedule needs no re-trace). The factor is a pure function of the position, so a resumed
program (:meth:`lwcompile.Program.load_state_dict` restores ``step_count``) continues the schedule exactly.

Example:
    >>> from lwcompile.config import Config
    >>> cfg = Config(inner_lr_warmup_steps=4, inner_lr_anneal="linear", inner_lr_anneal_steps=4)
    >>> [schedule_factor(cfg, s) for s in range(9)]
    [0.0, 0.25, 0.5, 0.75, 0.75, 0.5, 0.25, 0.0, 0.0]
"""
from __future__ import annotations

import math

from lwcompile.config import Config


def schedule_factor(config: Config, position: int) -> float:
    """The inner lr's multiplier at training step ``position`` (0-based: the number of steps already taken)."""
    every = config.inner_lr_schedule_every
    q = (position // every) * every  # the first step of the interval holding `position`
    warmup = config.inner_lr_warmup_steps
    if q < warmup:
        start = config.inner_lr_warmup_start
        return start + (1.0 - start) * (q / warmup)
    if config.inner_lr_anneal == "none":
        return 1.0
    # the fraction of the annealing done at the end of this interval (the official per-epoch decay's e + 1)
    done = min((q - warmup + every) / config.inner_lr_anneal_steps, 1.0)
    end = config.inner_lr_anneal_end
    if config.inner_lr_anneal == "linear":
        return 1.0 - (1.0 - end) * done
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * done))
