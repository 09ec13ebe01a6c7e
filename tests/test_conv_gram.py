"""passes/conv_gram.py: the structured Gram matrix and sums of a stride-1 conv equal those of its explicit
im2col patch matrix (the independent oracle: F.unfold, then XᵀX in float64)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lwcompile.passes.conv_gram import conv_gram, conv_gram_applies, conv_patch_sums, conv_stats


def _patches(x: torch.Tensor, k: tuple, p: tuple, groups: int) -> torch.Tensor:
    cols = F.unfold(x, k, padding=p)
    n, d, L = cols.shape
    return cols.reshape(n, groups, d // groups, L).permute(1, 0, 3, 2).reshape(groups, n * L, d // groups)


CASES = [((3, 2, 6, 5), (3, 3), (1, 1), 1), ((2, 4, 7, 9), (5, 3), (2, 0), 2), ((2, 3, 5, 5), (2, 4), (0, 1), 1),
         ((2, 6, 8, 8), (3, 3), (1, 1), 6), ((1, 1, 4, 4), (4, 4), (0, 0), 1), ((2, 2, 3, 7), (3, 5), (3, 1), 1)]


@pytest.mark.parametrize("shape,k,p,groups", CASES)
def test_gram_and_patch_sums_equal_the_unfolded_ones(shape, k, p, groups):
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(len(shape) + sum(k)))
    X = _patches(x, k, p, groups)
    G = conv_gram(x, k, p, groups)
    assert G.shape == (groups, X.shape[2], X.shape[2])
    torch.testing.assert_close(G, X.transpose(1, 2) @ X, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv_patch_sums(x, k, p, groups), X.sum(1, keepdim=True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups,cin,cout", [(1, 3, 4), (2, 4, 6), (4, 4, 4)])
def test_stats_equal_the_unfolded_least_squares_sums(groups, cin, cout):
    g = torch.Generator().manual_seed(groups)
    x = torch.randn(2, cin, 7, 6, dtype=torch.float64, generator=g)
    W = torch.randn(cout, cin // groups, 3, 3, dtype=torch.float64, generator=g)
    R = torch.randn(2, cout, 7, 6, dtype=torch.float64, generator=g)
    gram, rhs, s, rb, rows = conv_stats(x, W, R, (1, 1), groups, True)
    X = _patches(x, (3, 3), (1, 1), groups)
    Rr = R.reshape(2, groups, cout // groups, -1).permute(1, 0, 3, 2).reshape(groups, -1, cout // groups)
    for got, want in [(gram, X.mT @ X), (rhs, X.mT @ Rr), (s, X.sum(1, keepdim=True)), (rb, Rr.sum(1, keepdim=True))]:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert rows == X.shape[1]


def test_applies_only_to_stride_one_undilated_2d_kernels_larger_than_one():
    assert conv_gram_applies((3, 3), (1, 1), (1, 1))
    assert not conv_gram_applies((3, 3), (2, 2), (1, 1))
    assert not conv_gram_applies((3, 3), (1, 1), (2, 2))
    assert not conv_gram_applies((1, 1), (1, 1), (1, 1))
    assert not conv_gram_applies((3,), (1,), (1,))
