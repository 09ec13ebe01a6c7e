"""The exact inner solve split at its batch sums: the public form a data-parallel runtime all-reduces between.

The exact solve of :mod:`lwcompile.passes.exact_solver` needs the batch only through sums over its rows:
XᵀX, XᵀR, Xᵀ1, 1ᵀR and the row count (R = A − Z, the residual at the current weights). ``gram_stats`` computes
them on some rows (a rank's shard), a sum of them over shards is the whole batch's, and ``solve_stats`` turns the
summed statistics into the new weights with the same algebra as ``exact_solver._solve`` (bias eliminated by a
rank-one update; ``Config.prox_relative``'s λ = prox · tr(XᵀX)/D from the summed Gram matrix, so it is the whole
batch's too). The design-matrix helpers (``design``, ``out_rows``, ``weight_cols``, ``weight_from_cols``) are the ones
exact_solver uses too.

Example:
    >>> import torch
    >>> from lwcompile.ir import Block
    >>> blk = Block("fc", "fc", "linear", (), "identity", (), "fc.weight", None, (2, 3), None, (8, 3), (8, 2), 12)
    >>> x, W_true = torch.randn(8, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    >>> W0 = (torch.zeros(2, 3, dtype=torch.float64),)
    >>> halves = [gram_stats(blk, W0, x[i:i + 4], x[i:i + 4] @ W_true.T) for i in (0, 4)]
    >>> summed = tuple(a + b for a, b in zip(*halves))           # what an all-reduce over two ranks returns
    >>> (W,) = solve_stats(blk, W0, summed, prox=0.0)
    >>> torch.allclose(W, W_true)
    True
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from lwcompile.ir import Block
from lwcompile.passes.spd_solve import spd_solve  # noqa: F401 - registers torch.ops.lwcompile.spd_solve

Tensors = tuple[torch.Tensor, ...]


def im2col(x: torch.Tensor, k: tuple, stride: tuple, padding: tuple, dilation: tuple) -> torch.Tensor:
    """(N, C, *S) -> (N, C·∏k, L): the conv's input patches, channel-major like ``W.reshape(C_out, -1)``."""
    nd = len(k)
    if nd == 2:
        return F.unfold(x, k, dilation, padding, stride)
    if nd == 1:
        return F.unfold(x.unsqueeze(2), (1, k[0]), (1, dilation[0]), (0, padding[0]), (1, stride[0]))
    pad = [p for q in reversed(padding) for p in (q, q)]
    xp = F.pad(x, pad) if any(padding) else x
    out = [(xp.shape[2 + d] - dilation[d] * (k[d] - 1) - 1) // stride[d] + 1 for d in range(nd)]
    patches = []
    for offs in itertools.product(*(range(kd) for kd in k)):
        idx = [slice(None), slice(None)]
        for d in range(nd):
            s = offs[d] * dilation[d]
            idx.append(slice(s, s + stride[d] * (out[d] - 1) + 1, stride[d]))
        patches.append(xp[tuple(idx)])
    return torch.stack(patches, 2).reshape(x.shape[0], x.shape[1] * len(patches), -1)


def design(op: str, attrs: dict, x: torch.Tensor, target: torch.Tensor,
           W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(X (G, rows, D), A (G, rows, O), G): the least-squares problem(s) of one block on these examples. For
    addmm X is α·x, so that Z = X W holds for its (in, out) weight."""
    if op in ("linear", "matmul", "addmm"):
        X = x.reshape(1, -1, x.shape[-1])
        alpha = attrs.get("alpha", 1) if op == "addmm" else 1
        return (X if alpha == 1 else alpha * X), out_rows(op, target, 1), 1
    g = int(attrs["groups"])
    cols = im2col(x, tuple(W.shape[2:]), tuple(attrs["stride"]), tuple(attrs["padding"]), tuple(attrs["dilation"]))
    n, L = cols.shape[0], cols.shape[2]
    return cols.reshape(n, g, -1, L).permute(1, 0, 3, 2).reshape(g, n * L, -1), out_rows(op, target, g), g


def out_rows(op: str, t: torch.Tensor, groups: int) -> torch.Tensor:
    """An output-shaped tensor (target, pre-activation) as (G, rows, O)."""
    if op in ("linear", "matmul", "addmm"):
        return t.reshape(1, -1, t.shape[-1])
    n, c = t.shape[0], t.shape[1]
    return t.reshape(n, groups, c // groups, -1).permute(1, 0, 3, 2).reshape(groups, -1, c // groups)


def weight_cols(op: str, W: torch.Tensor, groups: int) -> torch.Tensor:
    """The weight as (G, D, O) so that Z = X @ it."""
    if op == "linear":
        return W.t().unsqueeze(0)
    if op in ("matmul", "addmm"):
        return W.unsqueeze(0)
    return W.reshape(groups, W.shape[0] // groups, -1).transpose(1, 2)


def weight_from_cols(op: str, W: torch.Tensor, dW: torch.Tensor) -> torch.Tensor:
    """W + the change ``dW`` given as (G, D, O) columns."""
    if op == "linear":
        return W + dW[0].t()
    if op in ("matmul", "addmm"):
        return W + dW[0]
    return W + dW.transpose(1, 2).reshape(W.shape)


def gram_stats(block: Block, params: Tensors, x: torch.Tensor, target: torch.Tensor) -> Tensors:
    """The solve's sums over these examples at ``params`` = (W, [b]): (XᵀX, XᵀR, Xᵀ1, 1ᵀR, rows), per group.

    addmm's bias enters as β·b, so its column of the design is β·1: the sums are β·Xᵀ1, β·1ᵀR and β²·rows (the
    bias column's squared norm), for which :func:`solve_stats`'s algebra is unchanged."""
    W = params[0]
    b = params[1] if block.bias is not None else None
    attrs = dict(block.attrs)
    beta = float(attrs.get("beta", 1)) if block.op == "addmm" else 1.0
    X, A, groups = design(block.op, attrs, x, target, W)
    Z = X @ weight_cols(block.op, W, groups)
    if b is not None:
        Z = Z + beta * b.reshape(groups, 1, -1)
    R = A - Z
    Xt = X.transpose(1, 2)
    rows = torch.tensor(beta * beta * float(X.shape[1]), dtype=X.dtype, device=X.device)
    return Xt @ X, Xt @ R, beta * X.sum(1, keepdim=True), beta * R.sum(1, keepdim=True), rows


def solve_stats(block: Block, params: Tensors, stats: Tensors, prox: float, relative: bool = False) -> Tensors:
    """New (W, [b]) from summed :func:`gram_stats` (``exact_solver._solve``'s primal path, on sums).

    ``relative`` is ``Config.prox_relative``: λ = prox · tr(XᵀX)/D per group, from the summed (whole-batch) Gram
    matrix; λ = prox · rows for a bias that moves alone."""
    gram, rhs, s, rb, rows_t = stats
    rows, prox = float(rows_t), float(prox)
    has_bias = block.bias is not None
    fit_w = block.weight not in block.frozen
    fit_b = has_bias and block.bias not in block.frozen
    W = params[0]
    b = params[1] if has_bias else None
    dW = db = None
    if not fit_w:
        lam_b = prox * rows if relative else prox
        db = rb.squeeze(1) / (rows + lam_b) if fit_b else None
    else:
        d = gram.shape[-1]
        lam: float | torch.Tensor = prox
        if relative and prox > 0:  # (G, 1, 1), before the bias is folded in (as exact_solver._solve)
            lam = prox * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
        if prox > 0:
            gram = gram + lam * torch.eye(d, dtype=gram.dtype, device=gram.device)
        if fit_b:
            n = rows + lam
            gram = gram - (s.transpose(1, 2) @ s) / n
            rhs = rhs - (s.transpose(1, 2) @ rb) / n
        dW = torch.ops.lwcompile.spd_solve(gram, rhs, block.name, prox)
        db = ((rb - s @ dW) / n).squeeze(1) if fit_b else None
    new_w = weight_from_cols(block.op, W, dW) if fit_w else W
    new_b = (b + db.reshape(b.shape)) if fit_b else b
    return (new_w, new_b) if has_bias else (new_w,)


__all__ = ["design", "gram_stats", "im2col", "out_rows", "solve_stats", "weight_cols", "weight_from_cols"]
