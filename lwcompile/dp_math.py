"""The inner-loop pieces the data-parallel runtime all-reduces between (the pure math of ``passes/inner.py`` and
``passes/exact_solver.py``, split at the points where a sum over the batch happens).

The runtime (:mod:`lwcompile.runtime.data_parallel`) imports no ``lwcompile.passes`` module; this module is the
seam: it reads the passes' pure functions and hands the runtime closures over plain tensors.

* ``local_grads(block, config, params, x, target)``: one inner iteration's weight gradient, summed over the
  (shard's) examples, before the proximal term: a sum over ranks of these is the full batch's.
* ``apply_update(...)``: the proximal term, frozen parameters and the optimizer update of ``make_inner_fn``.
* ``gram_stats`` / ``solve_stats``: the exact solve's batch sums (XᵀX, XᵀR, Xᵀ1, 1ᵀR, rows) and the solve from
  their all-reduced values (:mod:`lwcompile.passes.exact_stats`, the solve split at its batch sums).

Only public functions of the passes are used.

Example:
    >>> import torch
    >>> from lwcompile.config import Config
    >>> from lwcompile.ir import Block
    >>> blk = Block("fc", "fc", "linear", (), "identity", (), "fc.weight", None, (2, 3), None, (4, 3), (4, 2), 12)
    >>> cfg = Config(target="gd_pre", local_loss="squared_pre", inner_optimizer="gd")
    >>> (g,) = local_grads(blk, cfg, (torch.zeros(2, 3),), torch.ones(4, 3), torch.ones(4, 2))
    >>> g.shape
    torch.Size([2, 3])
"""
from __future__ import annotations

import torch

from lwcompile.config import Config
from lwcompile.ir import Block
from lwcompile.passes import exact_stats
from lwcompile.passes.inner import inner_lr_factor
from lwcompile.passes.linear_ops import LINEAR_OPS
from lwcompile.passes.local_losses import residual
from lwcompile.passes.optimizers import make_optimizer

Tensors = tuple[torch.Tensor, ...]


def local_grads(block: Block, config: Config, params: Tensors, x: torch.Tensor, target: torch.Tensor) -> Tensors:
    """∂(summed local loss)/∂(W, b) at ``params`` on these examples (no proximal term, frozen not zeroed)."""
    op = LINEAR_OPS[block.op]
    attrs, kw = dict(block.attrs), dict(block.transfer_kwargs)
    has_bias = block.bias is not None
    z = op.apply(x, params[0], params[1] if has_bias else None, attrs)
    r = residual(config.local_loss, block.transfer, kw, z, target)
    dW, db = op.weight_grad(x, r, block.weight_shape, attrs, has_bias)
    return (dW, db) if has_bias else (dW,)


def apply_update(block: Block, config: Config, grads: Tensors, state: Tensors, params: Tensors, anchor: Tensors,
                 lr: torch.Tensor, k: int) -> tuple[Tensors, Tensors]:
    """Inner iteration ``k``'s update from the full batch's ``grads`` (what ``make_inner_fn`` does after them)."""
    opt = make_optimizer(config.inner_optimizer, config.optimizer_options())
    frozen = tuple(p in block.frozen for p in block.params)
    if config.prox > 0:
        grads = tuple(g + config.prox * (p - a) for g, p, a in zip(grads, params, anchor))
    grads = tuple(torch.zeros_like(g) if f else g for g, f in zip(grads, frozen))
    new, state = opt.update(grads, state, params, lr * inner_lr_factor(k, config.steps, config.inner_lr_decay))
    return tuple(a if f else p for p, a, f in zip(new, anchor, frozen)), tuple(state)


def gram_stats(block: Block, params: Tensors, x: torch.Tensor, target: torch.Tensor) -> Tensors:
    """The exact solve's sums over these examples: (XᵀX, XᵀR, Xᵀ1, 1ᵀR, rows) per group (R = A − Z)."""
    return exact_stats.gram_stats(block, params, x, target)


def solve_stats(block: Block, config: Config, params: Tensors, stats: Tensors) -> Tensors:
    """New (W, [b]) from the all-reduced :func:`gram_stats` (``Config.prox`` and ``prox_relative`` as one process)."""
    return exact_stats.solve_stats(block, params, stats, config.prox, config.prox_relative)


__all__ = ["local_grads", "apply_update", "gram_stats", "solve_stats"]
