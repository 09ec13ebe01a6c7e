"""Exact inner solve for the squared pre-activation loss (METHOD.md, "Exact inner solve").

With local(z, a) = ½‖z − a‖² the inner problem of a block is ridge regression in its weights:
    min over W̃ of ½ Σ_i ‖W̃ x_i (+ b̃) − a_i‖² + (λ/2)‖W̃ − W‖²  (the bias in the proximal term too).
Writing W̃ = W + Δ, with X the rows x_iᵀ (a column of ones appended for a trainable bias) and R the residuals
a_i − z_i at the current weights, the minimizer is (XᵀX + λI) Δᵀ = XᵀR: one Cholesky solve of the batch-summed
Gram matrix replaces the T iterations (``Config(inner_optimizer="exact")``; T and the inner lr are unused).
Solving for the change Δ rather than for W̃ keeps float32 accurate: the solve's rounding scales with ‖Δ‖, not ‖W‖.

A convolution is the same problem on its unfolded (im2col) input, one problem per group; a stride-1 2-D conv forms
the sums XᵀX, XᵀR without unfolding (:mod:`lwcompile.passes.conv_gram`). ``make_exact_fn``
returns the pure function ``(W, [b], x, target, lr) -> (W', [b'])`` that :mod:`lwcompile.passes.inner` traces into
the block's inner graph, like every other inner optimizer (no optimizer state). The factorization itself is the
op ``torch.ops.lwcompile.spd_solve`` (:mod:`lwcompile.passes.spd_solve`): Cholesky in float32, then with a tiny
jitter, then in float64, and a clear
:class:`~lwcompile.errors.LwcompileError` when the system is singular (λ = 0 and a rank-deficient batch).

Example:
    >>> import torch
    >>> from lwcompile.config import Config
    >>> from lwcompile.ir import Block
    >>> blk = Block("fc", "fc", "linear", (), "identity", (), "fc.weight", None, (2, 3), None, (8, 3), (8, 2), 12)
    >>> fn = make_exact_fn(blk, Config(target="gd_pre", local_loss="squared_pre", inner_optimizer="exact"))
    >>> x, W_true = torch.randn(8, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    >>> W, = fn(torch.zeros(2, 3, dtype=torch.float64), x, x @ W_true.T, torch.tensor(0.0))
    >>> torch.allclose(W, W_true)
    True
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from lwcompile.config import Config
from lwcompile.errors import ConfigError, LwcompileError
from lwcompile.ir import Block
from lwcompile.passes.exact_gram import normal_equations, plan_chunks
from lwcompile.runtime.costs import exact_problem
from lwcompile.passes.conv_gram import conv_gram_applies, conv_stats
from lwcompile.passes.exact_stats import design, out_rows, solve_stats, weight_cols, weight_from_cols
from lwcompile.passes.spd_solve import spd_solve  # noqa: F401 - registers torch.ops.lwcompile.spd_solve

EXACT = "exact"
QUADRATIC_LOSSES = ("squared_pre",)  # local losses whose inner problem is least squares in W


def check_exact(block: Block, config: Config, batch: int | None = None) -> None:
    """Refuse (ConfigError) what the exact solve cannot do exactly, naming the block."""
    if config.local_loss not in QUADRATIC_LOSSES:
        raise ConfigError(f"Config(inner_optimizer='exact') solves the quadratic local loss "
                          f"{'/'.join(QUADRATIC_LOSSES)} in closed form; local_loss={config.local_loss!r} is not "
                          "quadratic in the weights: use an iterative inner optimizer (e.g. 'rmsprop_tf1').")
    attrs = dict(block.attrs)
    if block.op.startswith("conv_transpose"):
        raise ConfigError(f"block {block.name!r} ({block.op}): the exact inner solve handles linear, matmul and "
                          "conv1d/2d/3d blocks, not transposed convolutions; skip the block (Config.skip) or use an "
                          "iterative inner optimizer.")
    if block.op == "baddbmm":
        raise ConfigError(f"block {block.name!r} (baddbmm): the exact inner solve handles linear, matmul, addmm and "
                          "conv1d/2d/3d blocks, not batched baddbmm weights (a bias shared across the batch of "
                          "matrices couples their problems); use an iterative inner optimizer or skip the block "
                          "(Config.skip).")
    if block.op not in ("linear", "matmul", "addmm") and not block.op.startswith("conv"):
        raise ConfigError(f"block {block.name!r}: op {block.op!r} has no exact inner solve.")
    if block.op == "addmm" and block.bias is not None and len(attrs.get("bias_shape", ())) > 1 and (
            attrs["bias_shape"][0] != 1):
        raise ConfigError(f"block {block.name!r} (addmm): its bias of shape {attrs['bias_shape']} holds a value per "
                          "row, not per output; the exact inner solve fits a bias shared by the rows ((out,) or "
                          "(1, out)): use an iterative inner optimizer.")
    if attrs.get("padding_mode", "zeros") != "zeros":
        raise ConfigError(f"block {block.name!r}: padding_mode={attrs['padding_mode']!r}; the exact inner solve "
                          "unfolds zero-padded inputs only: use padding_mode='zeros' or an iterative inner optimizer.")
    if block.op.startswith("conv") and not all(isinstance(p, int) for p in attrs.get("padding", ())):
        raise ConfigError(f"block {block.name!r}: padding {attrs.get('padding')!r} is not a tuple of ints.")
    if block.op in ("matmul", "addmm") and len(block.weight_shape) != 2:
        raise ConfigError(f"block {block.name!r}: a matmul weight of shape {block.weight_shape} is not a matrix.")
    if config.prox == 0 and block.weight not in block.frozen:
        _, rows, cols, _ = exact_problem(block, batch)
        if rows < cols:
            raise ConfigError(
                f"block {block.name!r}: with Config.prox=0 the exact inner solve's {cols}x{cols} system has rank at "
                f"most {rows} (rows of the batch): it is singular. Use Config(prox=...) > 0 (e.g. 1.0) or a larger "
                "batch.")


# ---------------------------------------------------------------- the inner function
def make_exact_fn(block: Block, config: Config, preact_given: bool = False,
                  offset: bool = False) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``(W, [b], x, target, lr[, â]) -> (W', [b'])``: the exact minimizer of the block's local problem.

    ``preact_given=True`` adds the forward pass's pre-activation â = op(x; W, b) as the last input, saving the
    recomputation of Z = XWᵀ (2·rows·D·O FLOPs, about a quarter of the solve; ``Config.reuse_preactivation``).
    ``offset=True``: the input after x is the target's offset d = â − a (γ·∂L/∂â), and the residual at the
    current weights is R = A − Z = −d exactly: neither Z nor A is formed (â, when given, is not read), so R keeps
    the precision of γ·∂L/∂â instead of losing eps·|â| to A − Z.
    """
    check_exact(block, config)
    attrs = dict(block.attrs)
    has_bias = block.bias is not None
    fit_w = block.weight not in block.frozen
    fit_b = has_bias and block.bias not in block.frozen
    prox = float(config.prox)
    relative = bool(config.prox_relative)
    per_output = config.residual_norm == "output"
    op = block.op
    beta = float(attrs.get("beta", 1)) if op == "addmm" else 1.0  # addmm: z = β·b + α·xW (α is in the design)

    structured = op.startswith("conv") and conv_gram_applies(tuple(block.weight_shape[2:]), tuple(attrs["stride"]),
                                                               tuple(attrs["dilation"]))

    def exact_update(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        W = flat[0]
        b = flat[1] if has_bias else None
        x, target = flat[1 + has_bias], flat[2 + has_bias]
        if structured:  # stride-1 2-D conv: the sums without a patch matrix (passes/conv_gram.py)
            if offset:  # target is d = â − a: the residual is −d exactly
                R = -target
            else:
                Z = flat[4 + has_bias] if preact_given else F.conv2d(x, W, b, 1, tuple(attrs["padding"]), 1,
                                                                     int(attrs["groups"]))
                R = target - Z
            if per_output:  # every output channel over (N, *spatial)
                R = equalize_outputs(R, (0, *range(2, R.dim())))
            stats = conv_stats(x, W, R, tuple(attrs["padding"]), int(attrs["groups"]), has_bias)
            return solve_stats(block, flat[:1 + has_bias], stats, prox, relative)
        chunks = _conv_chunks(op, attrs, x, target, W, fit_w, fit_b, prox)
        if chunks is not None:  # a large conv: the normal equations summed over chunks of the batch
            if per_output:
                raise LwcompileError(f"block {block.name!r}: Config.residual_norm='output' needs the whole residual "
                                     "at once and this conv's exact solve is chunked over the batch: skip the block "
                                     "(Config.skip) or use residual_norm='none'.")
            dW, db = _solve_chunked(op, attrs, x, target, flat[4 + has_bias] if preact_given else None, W, b,
                                    chunks, fit_b, prox, block.name, relative, offset)
            new_w = weight_from_cols(op, W, dW)
            new_b = (b + db.reshape(b.shape)) if fit_b else b
            return (new_w, new_b) if has_bias else (new_w,)
        X, A, groups = design(op, attrs, x, target, W)
        if offset:  # target is d = â − a: R = A − Z = −d (the design's A is d's rows)
            R = -A
        elif preact_given:
            Z = out_rows(op, flat[4 + has_bias], groups)
        else:
            Z = X @ weight_cols(op, W, groups)  # the current pre-activation, (G, rows, O)
            if b is not None:
                Z = Z + beta * b.reshape(groups, 1, -1)
        if not offset:
            R = A - Z
        if per_output:  # (G, rows, O): every group's output columns
            R = equalize_outputs(R, (1,))
        dW, db = _solve(X, R, fit_w, fit_b, prox, block.name, relative, beta)
        new_w = weight_from_cols(op, W, dW) if fit_w else W
        new_b = (b + db.reshape(b.shape)) if fit_b else b
        return (new_w, new_b) if has_bias else (new_w,)

    return exact_update


def equalize_outputs(R: torch.Tensor, over: tuple[int, ...]) -> torch.Tensor:
    """``Config.residual_norm="output"``: R with each output's norm over the dims ``over`` (the rows) set to the
    root-mean-square of all outputs' norms, ‖R_j‖ → ‖R‖_F/√O. An all-zero output stays zero.

    >>> R = equalize_outputs(torch.tensor([[3.0, 0.0], [4.0, 1.0]]), (0,))  # column norms 5 and 1 -> both √13
    >>> [round(float(v) ** 2, 4) for v in R.norm(dim=0)]
    [13.0, 13.0]
    """
    col = R.pow(2).sum(over, keepdim=True)
    mean = col.mean().sqrt()  # over every output (and group) of the block
    col = col.sqrt()
    return R * torch.where(col > 0, mean / torch.where(col > 0, col, torch.ones_like(col)), torch.zeros_like(col))


def _solve(X: torch.Tensor, R: torch.Tensor, fit_w: bool, fit_b: bool, prox: float,
           name: str, relative: bool = False, beta: float = 1.0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(ΔW (G, D, O), Δb (G, O)) minimizing ½‖X ΔW + β1 Δbᵀ − R‖² + (λ/2)(‖ΔW‖² + ‖Δb‖²) (β: addmm's bias
    factor, 1 otherwise; the bias column is β·1).

    With a bias the normal equations are [[XᵀX + λI, s], [sᵀ, n]] [ΔW; Δbᵀ] = [XᵀR; 1ᵀR] (s = Xᵀ1, n = rows + λ).
    Eliminating Δb first leaves the Schur complement XᵀX + λI − s sᵀ/n (positive definite when the whole system
    is: the Gram matrix of the centred X when λ = 0) and Δb = (1ᵀR − sᵀΔW)/n: one rank-one update of the D×D
    matrix instead of copying it into a (D+1)×(D+1) one.

    ``relative=True`` (``Config.prox_relative``) makes λ = prox · tr(XᵀX)/D, per group and per batch: the damping
    follows each block's own input scale and the batch size (the bias column's mean diagonal is rows, so its λ is
    prox · rows when only the bias moves).
    """
    g, rows, d = X.shape
    b2 = beta * beta
    if not fit_w:  # only the bias moves: a mean, shrunk by λ
        lam_b = prox * rows * b2 if relative else prox
        return None, (beta * R.sum(1) / (b2 * rows + lam_b) if fit_b else None)
    Xt = X.transpose(1, 2)
    if prox > 0 and rows < d + fit_b:
        return _solve_dual(X, R, fit_b, prox, name, relative, beta)
    gram, rhs = Xt @ X, Xt @ R
    # the bias column is β·1: (G, 1, D), (G, 1, O)
    s, rb = (beta * X.sum(1, keepdim=True), beta * R.sum(1, keepdim=True)) if fit_b else (None, None)
    return _solve_normal(gram, rhs, s, rb, rows, fit_b, prox, name, relative, b2)


def _solve_normal(gram: torch.Tensor, rhs: torch.Tensor, s: torch.Tensor | None, rb: torch.Tensor | None,
                  rows: int, fit_b: bool, prox: float, name: str,
                  relative: bool, b2: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_solve` from the normal equations' sums: XᵀX, XᵀR and (with a bias) β·Xᵀ1, β·1ᵀR (b2 = β²)."""
    d = gram.shape[-1]
    lam: float | torch.Tensor = prox
    if relative and prox > 0:  # (G, 1, 1): the mean diagonal of each group's Gram matrix, before the bias is folded in
        lam = prox * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
    if prox > 0:
        gram = gram + lam * torch.eye(d, dtype=gram.dtype, device=gram.device)
    if fit_b:
        n = b2 * rows + lam
        if isinstance(n, torch.Tensor):  # relative λ: n differs per group, baddbmm's alpha must be a number
            gram = gram - (s.transpose(1, 2) @ s) / n
            rhs = rhs - (s.transpose(1, 2) @ rb) / n
        else:
            gram = torch.baddbmm(gram, s.transpose(1, 2), s, alpha=-1.0 / n)
            rhs = torch.baddbmm(rhs, s.transpose(1, 2), rb, alpha=-1.0 / n)
    dW = torch.ops.lwcompile.spd_solve(gram, rhs, name, prox)
    db = ((rb - s @ dW) / n).squeeze(1) if fit_b else None
    return dW, db


def _conv_chunks(op: str, attrs: dict, x: torch.Tensor, target: torch.Tensor, W: torch.Tensor, fit_w: bool,
                 fit_b: bool, prox: float) -> list[tuple[int, int]] | None:
    """Chunks of the batch for a conv block whose full patch matrix exceeds
    :data:`~lwcompile.passes.exact_gram.CHUNK_ELEMENTS` (None: form it whole, as linear blocks, the dual solve
    and bias-only problems always do)."""
    if not op.startswith("conv") or not fit_w:
        return None
    g = int(attrs["groups"])
    per_example = math.prod(int(d) for d in target.shape[2:])
    cols = (x.shape[1] // g) * math.prod(int(k) for k in W.shape[2:])
    if prox > 0 and x.shape[0] * per_example < cols + fit_b:
        return None  # the dual (rows × rows) solve needs every row at once
    chunks = plan_chunks(x.shape[0], per_example, cols, g)
    return chunks if len(chunks) > 1 else None


def _solve_chunked(op: str, attrs: dict, x: torch.Tensor, target: torch.Tensor, preact: torch.Tensor | None,
                   W: torch.Tensor, b: torch.Tensor | None, chunks: list[tuple[int, int]], fit_b: bool, prox: float,
                   name: str, relative: bool, offset: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_solve` for a conv block, its design rows formed one chunk of examples at a time (``offset``: the
    target input is the offset d, the residual −d)."""
    groups = int(attrs["groups"])
    Wc = weight_cols(op, W, groups)

    def rows_of(start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        X, A, _ = design(op, attrs, x.narrow(0, start, length), target.narrow(0, start, length), W)
        if offset:
            return X, -A
        if preact is not None:
            Z = out_rows(op, preact.narrow(0, start, length), groups)
        else:
            Z = X @ Wc
            if b is not None:
                Z = Z + b.reshape(groups, 1, -1)
        return X, A - Z

    gram, rhs, s, rb = normal_equations(chunks, rows_of, fit_b)
    rows = x.shape[0] * math.prod(int(d) for d in target.shape[2:])
    return _solve_normal(gram, rhs, s, rb, rows, fit_b, prox, name, relative)


def _solve_dual(X: torch.Tensor, R: torch.Tensor, fit_b: bool, prox: float, name: str,
                relative: bool, beta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same minimizer through the rows×rows system, for batches with fewer rows than unknowns (λ > 0).

    With X̃ = [X 1] (the ones column only with a trainable bias) the normal equations (X̃ᵀX̃ + λI)Δ = X̃ᵀR have the
    solution Δ = X̃ᵀ(X̃X̃ᵀ + λI)⁻¹R (push-through identity), and X̃X̃ᵀ = XXᵀ + 11ᵀ: a rows×rows Cholesky
    instead of a D×D one. For a 784-input layer at batch 256 it is about 3× fewer FLOPs, the same numbers.
    """
    g, rows, d = X.shape
    K = X @ X.transpose(1, 2)
    lam: float | torch.Tensor = prox
    if relative:  # tr(XᵀX)/D = tr(XXᵀ)/D, per group: read off K's diagonal, not from X again
        lam = prox * K.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None] / d
    K = K + lam * torch.eye(rows, dtype=X.dtype, device=X.device)
    if fit_b:  # the bias column β·1 adds β²·11ᵀ
        K = K + beta * beta
    Y = torch.ops.lwcompile.spd_solve(K, R, name, prox)  # (G, rows, O)
    # ΔW formed as (G, O, D) and handed on transposed: a linear weight (O, D) then adds it without a strided read
    return (Y.transpose(1, 2) @ X).transpose(1, 2), (beta * Y.sum(1) if fit_b else None)
