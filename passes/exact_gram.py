"""The exact solve's normal equations accumulated over chunks of the batch (no full im2col patch matrix).

A convolution's least-squares problem (:mod:`lwcompile.passes.exact_solver`) has one row per example and output
position: for the MNIST CNN's second conv at batch 256 the patch matrix X is 50 176 × 400 floats (77 MiB), and
unfolding it copies it once more. The solve needs only XᵀX (D × D), XᵀR (D × O) and, with a bias, the column sums
of X and R; each is a sum over rows, so it can be summed chunk by chunk over the examples, holding one chunk's
patches at a time. Same sums in another order: equal to float rounding (tests/test_exact_gram.py checks float64).

Example:
    >>> import torch
    >>> plan_chunks(batch=256, rows_per_example=196, cols=400, groups=1, budget=4 * 2 ** 20)
    [(0, 53), (53, 53), (106, 53), (159, 53), (212, 44)]
    >>> X, R = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    >>> gram, rhs, s, rb = normal_equations([(0, 6), (6, 4)], lambda i, n: (X[None, i:i + n], R[None, i:i + n]), True)
    >>> bool(torch.allclose(gram[0], X.T @ X)) and bool(torch.allclose(rb[0], R.sum(0, keepdim=True)))
    True
"""
from __future__ import annotations

from typing import Callable

import torch

# Elements of one chunk's patch matrix (all groups): 16 MiB in float32. Below it the patches are formed whole.
CHUNK_ELEMENTS = 4 * 2 ** 20


def plan_chunks(batch: int, rows_per_example: int, cols: int, groups: int,
                budget: int | None = None) -> list[tuple[int, int]]:
    """(start, length) slices of the batch whose patch matrices (G × length·rows_per_example × cols) hold at most
    ``budget`` (default :data:`CHUNK_ELEMENTS`) elements each (at least one example per chunk); one slice when the
    whole batch fits."""
    budget = CHUNK_ELEMENTS if budget is None else budget
    per_example = max(1, groups * rows_per_example * cols)
    step = max(1, min(batch, budget // per_example))
    return [(i, min(step, batch - i)) for i in range(0, batch, step)]


def normal_equations(chunks: list[tuple[int, int]],
                     rows_of: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
                     fit_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(XᵀX (G, D, D), XᵀR (G, D, O), Xᵀ1 (G, 1, D), 1ᵀR (G, 1, O)) summed over ``chunks``; ``rows_of(start,
    length)`` gives one chunk's design rows X (G, rows, D) and residual rows R (G, rows, O). The sums are None
    without a trainable bias."""
    gram = rhs = s = rb = None
    for start, length in chunks:
        X, R = rows_of(start, length)
        Xt = X.transpose(1, 2)
        g, r = Xt @ X, Xt @ R
        gram, rhs = (g, r) if gram is None else (gram + g, rhs + r)
        if fit_b:
            cs, cr = X.sum(1, keepdim=True), R.sum(1, keepdim=True)
            s, rb = (cs, cr) if s is None else (s + cs, rb + cr)
        del X, R, Xt  # one chunk's patches alive at a time
    return gram, rhs, s, rb
