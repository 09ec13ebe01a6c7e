"""Inner-update graphs: T optimizer steps on one block's local loss + proximal term.

``make_inner_fn(block, config)`` returns a pure function
``(W, [b], x, target, lr, *state) -> (W', [b'], *state')`` and ``build_inner_graph`` traces it with
``make_fx`` into a standalone GraphModule (the T iterations unrolled into plain ops, printable via
``.code``). The weight gradient is the closed form of METHOD.md: the local loss's residual r = ∂ℓ/∂z,
pushed through the linear op's weight-VJP (``r x`` for linear, a convolution for conv).

Example:
    >>> import torch
    >>> from lwcompile.config import Config
    >>> from lwcompile.ir import Block
    >>> blk = Block("fc", "fc", "linear", (), "tanh", (), "fc.weight", None, (2, 3), None, (4, 3), (4, 2), 12)
    >>> gm = build_inner_graph(blk, Config(steps=2, inner_optimizer="gd"))
    >>> W, = gm(torch.zeros(2, 3), torch.randn(4, 3), torch.randn(4, 2), torch.tensor(0.1))
    >>> W.shape
    torch.Size([2, 3])
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from lwcompile.config import Config
from lwcompile.ir import Block
from lwcompile.passes.exact_solver import EXACT, check_exact, make_exact_fn
from lwcompile.passes.linear_ops import LINEAR_OPS
from lwcompile.passes.local_losses import LOSS_RULES, needs_z, residual, residual_from_offset
from lwcompile.passes.transfer import TRANSFERS
from lwcompile.passes.optimizers import make_optimizer
from lwcompile.passes.signatures import InnerSignature


def inner_lr_factor(k: int, steps: int, decay: bool) -> float:
    """The official code's inner step decay: lr · max(1 − k/T, 0.25) at inner iteration k (0-based)."""
    return max(1.0 - k / steps, 0.25) if decay else 1.0


def make_inner_fn(block: Block, config: Config, preact: bool = False,
                  offset: bool = False) -> Callable[..., tuple[torch.Tensor, ...]]:
    """The pure function the inner graph is traced from; ``preact=True`` takes â = op(x; W, b) after ``lr`` and
    uses it as the first iteration's z (the forward pass computed it with the same op on the same values).

    ``offset=False`` (the target form): the input after x is the target t, and each iteration's residual is
    formed from s(z) − t (s = identity or f, the local loss's space). ``offset=True`` (the offset form, what
    ``Program.step`` runs): that input is the target's offset d = base − t = γ·g (``make_offset``), and
    s(z) − t is formed as (s(z) − s(z₀)) + d, with z − z₀ = op(x; W̃ − W, b̃ − b) computed from the weight change
    (exactly zero in the first iteration). Since t = base − d is never formed, γ·g keeps its own relative
    precision: with T = 1 plain GD the update is the SGD step to float rounding of γ·g, where the target form
    loses eps·|base| (a tiny gradient next to a large pre-activation, e.g. a layer scale of 1e-6). Every
    (target, local loss) pair Config accepts has one activation space, so the offset form covers all of them;
    the target form stays for callers holding targets only (``Program.inner_jobs`` without offsets).
    """
    if config.inner_optimizer == EXACT:  # one closed-form solve instead of T iterations
        return make_exact_fn(block, config, preact_given=preact, offset=offset)
    if offset:
        return _make_offset_fn(block, config, preact)
    op = LINEAR_OPS[block.op]
    attrs, kw = dict(block.attrs), dict(block.transfer_kwargs)
    opt = make_optimizer(config.inner_optimizer, config.optimizer_options())
    n = len(block.params)
    has_bias = block.bias is not None
    frozen = tuple(p in block.frozen for p in block.params)

    def inner_update(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        anchor = tuple(flat[:n])
        x, target, lr = flat[n], flat[n + 1], flat[n + 2]
        z0 = flat[n + 3] if preact else None
        state = tuple(flat[n + 3 + preact:])
        params = anchor
        for k in range(config.steps):
            z = z0 if k == 0 and preact else op.apply(x, params[0], params[1] if has_bias else None, attrs)
            r = residual(config.local_loss, block.transfer, kw, z, target)
            # conv rows read the weight's shape only: the weight itself keeps its shape out of the graph's constants
            dW, db = op.weight_grad(x, r, params[0] if block.op.startswith("conv") else block.weight_shape, attrs,
                                    has_bias)
            grads = (dW, db) if has_bias else (dW,)
            if config.prox > 0:
                grads = tuple(g + config.prox * (p - a) for g, p, a in zip(grads, params, anchor))
            grads = tuple(torch.zeros_like(g) if f else g for g, f in zip(grads, frozen))
            params, state = opt.update(grads, state, params, lr * inner_lr_factor(k, config.steps, config.inner_lr_decay))
            # requires_grad=False means "never changes": keep the exact old value, not old − lr·0
            params = tuple(a if f else p for p, a, f in zip(params, anchor, frozen))
        return (*params, *state)

    return inner_update


def _make_offset_fn(block: Block, config: Config, preact: bool) -> Callable[..., tuple[torch.Tensor, ...]]:
    """The offset form of :func:`make_inner_fn`: ``(W, [b], x, d, lr, [â], *state) -> (W', [b'], *state')``."""
    op = LINEAR_OPS[block.op]
    attrs, kw = dict(block.attrs), dict(block.transfer_kwargs)
    opt = make_optimizer(config.inner_optimizer, config.optimizer_options())
    n = len(block.params)
    has_bias = block.bias is not None
    frozen = tuple(p in block.frozen for p in block.params)
    loss, row = config.local_loss, TRANSFERS[block.transfer]
    post = LOSS_RULES[loss].space == "post"
    with_z = needs_z(loss)

    def inner_update(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        anchor = tuple(flat[:n])
        x, d, lr = flat[n], flat[n + 1], flat[n + 2]
        state = tuple(flat[n + 3 + preact:])
        z0 = s0 = None
        if with_z:
            z0 = flat[n + 3] if preact else op.apply(x, anchor[0], anchor[1] if has_bias else None, attrs)
            s0 = row.f(z0, kw) if post else None
        params = anchor
        for k in range(config.steps):
            if k == 0:  # W̃ = W: z − z₀ is exactly zero, u is the offset itself
                z, u = z0, d
            else:
                dz = op.apply(x, params[0] - anchor[0], (params[1] - anchor[1]) if has_bias else None, attrs)
                z = z0 + dz if with_z else None
                u = (row.f(z, kw) - s0 if post else dz) + d
            r = residual_from_offset(loss, block.transfer, kw, z, u)
            # conv rows read the weight's shape only: the weight itself keeps its shape out of the graph's constants
            dW, db = op.weight_grad(x, r, params[0] if block.op.startswith("conv") else block.weight_shape, attrs,
                                    has_bias)
            grads = (dW, db) if has_bias else (dW,)
            if config.prox > 0:
                grads = tuple(g + config.prox * (p - a) for g, p, a in zip(grads, params, anchor))
            grads = tuple(torch.zeros_like(g) if f else g for g, f in zip(grads, frozen))
            step = lr * inner_lr_factor(k, config.steps, config.inner_lr_decay)
            params, state = opt.update(grads, state, params, step)
            params = tuple(a if f else p for p, a, f in zip(params, anchor, frozen))
        return (*params, *state)

    return inner_update


def inner_example(block: Block, config: Config, batch: int | None = None,
                  dtype: torch.dtype = torch.float32, x_shape: tuple[int, ...] | None = None,
                  target_shape: tuple[int, ...] | None = None, preact: bool = False) -> tuple[torch.Tensor, ...]:
    """Zero tensors with the shapes of the inner graph's inputs (for tracing and export). ``x_shape`` and
    ``target_shape`` override the block's input and target shapes (a batch that is not the first axis, as in an
    attention projection's (sequence, batch, features) input, changes more than ``batch``); ``preact`` adds the
    pre-activation input (shaped like the target: transfer functions keep the shape)."""
    b = block.input_shape[0] if batch is None else batch
    params = [torch.zeros(block.weight_shape, dtype=dtype)]
    if block.bias_shape is not None:
        params.append(torch.zeros(block.bias_shape, dtype=dtype))
    opt = make_optimizer(config.inner_optimizer, config.optimizer_options())
    # clones: init may return one zeros tensor for two slots (Adam's m and v), and make_fx traces one tensor
    # passed twice as one placeholder, so the graph would read the second slot's input for both
    state = tuple(s.clone() for s in opt.init(tuple(params)))
    x = torch.zeros(x_shape if x_shape is not None else (b, *block.input_shape[1:]), dtype=dtype)
    t = torch.zeros(target_shape if target_shape is not None else (b, *block.output_shape[1:]), dtype=dtype)
    z = (torch.zeros_like(t),) if preact else ()
    return (*params, x, t, torch.tensor(config.inner_lr, dtype=dtype), *z, *state)


def build_inner_graph(block: Block, config: Config, example: tuple[torch.Tensor, ...] | None = None,
                      preact: bool = False, offset: bool = False) -> fx.GraphModule:
    """The block's inner-update GraphModule, traced for the shapes of ``example`` (default: the block's);
    ``preact=True``: the graph that takes the forward pass's pre-activation; ``offset=True``: the graph that takes
    the target's offset instead of the target (see :func:`make_inner_fn`)."""
    example = inner_example(block, config, preact=preact) if example is None else example
    gm = make_fx(make_inner_fn(block, config, preact, offset), tracing_mode="fake")(*example)
    gm.recompile()
    return gm


def inner_key(block: Block, config: Config) -> tuple:
    """What a block's inner graph depends on besides the example's shapes and dtype: blocks with equal keys
    (same op and its arguments, parameter shapes, transfer function, frozen pattern) share one traced graph.
    The exact solver names its block in the errors it raises at run time, so it keeps one graph per block.

    >>> a = Block("a", "a", "linear", (), "relu", (), "a.weight", None, (2, 3), None, (4, 3), (4, 2), 12)
    >>> b = Block("b", "b", "linear", (), "relu", (), "b.weight", None, (2, 3), None, (4, 3), (4, 2), 12)
    >>> inner_key(a, Config()) == inner_key(b, Config())
    True
    """
    frozen = tuple(p in block.frozen for p in block.params)
    own = (block.name,) if config.inner_optimizer == EXACT else ()
    # repr: op arguments and transfer options are plain values; repr makes any of them hashable, floats exactly
    return (block.op, repr(block.attrs), block.transfer, repr(block.transfer_kwargs), tuple(block.weight_shape),
            None if block.bias_shape is None else tuple(block.bias_shape), frozen, *own)


def inner_signature(block: Block, config: Config, preact: bool = False, offset: bool = False) -> InnerSignature:
    """The inner graph's signature: its inputs and outputs by name (``offset``: see :func:`make_inner_fn`)."""
    if config.inner_optimizer == EXACT:  # computed at compile time: refuse blocks it cannot solve exactly here
        check_exact(block, config)
    opt = make_optimizer(config.inner_optimizer, config.optimizer_options())
    params = ("weight", "bias") if block.bias is not None else ("weight",)
    return InnerSignature(params, len(opt.init(tuple(torch.zeros(1) for _ in params))), preact, offset)
