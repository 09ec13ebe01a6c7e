"""``torch.ops.lwcompile.spd_solve``: the exact inner solve's factorization as one graph op (used by
:mod:`lwcompile.passes.exact_solver` and :mod:`lwcompile.passes.exact_stats`).

Example:
    >>> import torch
    >>> g = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    >>> torch.ops.lwcompile.spd_solve(g, torch.tensor([[2.0], [4.0]]), "blk", 0.0).flatten().tolist()
    [1.0, 1.0]
"""
from __future__ import annotations

import torch

from lwcompile.errors import LwcompileError


@torch.library.custom_op("lwcompile::spd_solve", mutates_args=())
def spd_solve(gram: torch.Tensor, rhs: torch.Tensor, block: str, prox: float) -> torch.Tensor:
    """Solve gram @ out = rhs for symmetric positive (semi)definite, possibly batched, ``gram``.

    Cholesky in the input dtype. With ``prox > 0`` the system is positive definite in exact arithmetic, so a
    failure is rounding: retry with a jitter of 1e-6 × the mean diagonal (float32's rounding level of the Gram
    matrix). Then float64 without jitter. What still fails is singular (only possible with ``prox == 0``, e.g. an
    input feature that is zero for the whole batch): refused, naming ``block``, never silently regularized.
    """
    d = gram.shape[-1]
    L, info = torch.linalg.cholesky_ex(gram)
    if bool((info == 0).all()):
        return torch.cholesky_solve(rhs, L).contiguous()
    if gram.dtype != torch.float64:
        if prox > 0:
            scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[..., None, None]
            eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
            L, info = torch.linalg.cholesky_ex(gram + 1e-6 * scale * eye)
            if bool((info == 0).all()):
                return torch.cholesky_solve(rhs, L).contiguous()
        L, info = torch.linalg.cholesky_ex(gram.double())
        if bool((info == 0).all()):
            return torch.cholesky_solve(rhs.double(), L).to(rhs.dtype).contiguous()
    hint = ("with Config.prox=0 the Gram matrix XᵀX is singular whenever the batch's inputs do not span the input "
            "space (fewer rows than features, or a feature that is zero or constant over the batch, like MNIST's "
            "border pixels); use Config(prox=...) > 0 (e.g. 1.0)") if prox == 0 else (
            "the Gram matrix is not positive definite even with the proximal term: check the block's inputs for "
            "NaN/inf")
    raise LwcompileError(f"block {block!r}: the exact inner solve's {d}x{d} system is singular; {hint}.")


@spd_solve.register_fake
def _(gram: torch.Tensor, rhs: torch.Tensor, block: str, prox: float) -> torch.Tensor:
    # contiguous like the real kernel's result (cholesky_solve alone returns column-major): torch.compile checks it
    return rhs.new_empty(rhs.shape)
