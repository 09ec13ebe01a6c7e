"""The Gram matrix XᵀX of a stride-1 convolution's unfolded input, without unfolding it.

The exact inner solve of a conv block (:mod:`lwcompile.passes.exact_solver`) needs XᵀX of the im2col patch
matrix X: rows N·L (examples × output positions), columns C·kh·kw. Built directly that costs N·L·(C·kh·kw)² MACs
and an N·L × C·kh·kw buffer: for a 5×5 conv on 16 channels of 14×14 maps at batch 256, 8 G MACs and 80 MB, four
times the rest of the step. But an entry of XᵀX pairs two kernel offsets (i, j), (i', j') and only through their
difference (Δu, Δv) = (i' − i, j' − j) and the output window:

    G[(c,i,j), (d,i',j')] = Σ_{u ∈ [i, i+Ho), v ∈ [j, j+Wo)} S_{Δu,Δv}[c, d, u, v],
    S_{Δu,Δv}[c, d, u, v] = Σ_n xp[n, c, u, v] · xp[n, d, u + Δu, v + Δv]      (xp: the zero-padded input).

So :func:`conv_gram` forms, for each row offset Δu ≥ 0, one batched product over rows u of the (Wp·C) × N
slices of xp (every column pair of two rows at once; the pairs with |Δv| ≥ kw are unused), reads the bands
|Δv| < kw off as diagonals, and takes each window's sum as the whole sum less its few edge rows (and prefix
sums along v). That is about
Σ_{Δu<kh} (Hp − Δu)·(Wp·C)²·N MACs: for the example above 1.7 G instead of 8 G, with no patch matrix. The lower
half (Δu < 0) is the transpose of the upper. Exact in exact arithmetic: the numbers differ from XᵀX by
summation order only (float64 tests in tests/test_conv_gram.py).

The patch columns are ordered channel-major, then kernel row, then kernel column, like ``F.unfold`` and
``W.reshape(C_out, -1)``; groups give one Gram matrix each.

Example:
    >>> import torch, torch.nn.functional as F
    >>> x = torch.randn(3, 2, 6, 5, dtype=torch.float64)
    >>> X = F.unfold(x, (3, 3), padding=1).transpose(1, 2).reshape(-1, 18)
    >>> torch.allclose(conv_gram(x, (3, 3), (1, 1))[0], X.T @ X)
    True
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_gram_applies(kernel: tuple, stride: tuple, dilation: tuple) -> bool:
    """Whether :func:`conv_gram` handles this conv (2-D, stride 1, dilation 1) and is cheaper than unfolding."""
    return (len(kernel) == 2 and all(s == 1 for s in stride) and all(d == 1 for d in dilation)
            and kernel[0] * kernel[1] > 1)


def conv_gram(x: torch.Tensor, kernel: tuple[int, int], padding: tuple[int, int], groups: int = 1) -> torch.Tensor:
    """(groups, Cg·kh·kw, Cg·kh·kw): XᵀX of the stride-1, dilation-1 im2col matrix of ``x`` (N, C, H, W), per group."""
    kh, kw = kernel
    ph, pw = padding
    n, c, _, _ = x.shape
    cg = c // groups
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    hp, wp = xp.shape[2], xp.shape[3]
    ho, wo = hp - kh + 1, wp - kw + 1
    # (groups, Hp, Wp·Cg, N): one row u is a (Wp·Cg) × N matrix
    rows = xp.reshape(n, groups, cg, hp, wp).permute(1, 3, 4, 2, 0).reshape(groups, hp, wp * cg, n)
    d = cg * kh * kw
    ii = torch.arange(kh, device=x.device)
    jj = torch.arange(kw, device=x.device)
    per_du = []
    for du in range(kh):
        a, b = rows[:, :hp - du], rows[:, du:]
        m = a @ b.transpose(-1, -2)  # (groups, U, Wp·Cg, Wp·Cg): Σ_n over every column pair of rows u, u + Δu
        # the window u ∈ [i, i + Ho) for each i < kh − Δu: all U = Ho + kh − 1 − Δu rows less e = kh − 1 − Δu
        # of them at the two ends, so sum once and subtract the few edge rows (no prefix sum over every row)
        e = kh - 1 - du
        win = m.sum(1, keepdim=True)
        if e:
            head = F.pad(m[:, :e].cumsum(1), (0, 0, 0, 0, 1, 0))  # head[i] = Σ_{u < i}
            tail = F.pad(m[:, m.shape[1] - e:].flip(1).cumsum(1), (0, 0, 0, 0, 1, 0))  # tail[k]: the last k rows
            win = win - head - tail.flip(1)  # (groups, e + 1, ...): i = 0 … e
        win = win.reshape(groups, e + 1, wp, cg, wp, cg)
        iu = ii.clamp(max=e)  # rows i > e are never read: any valid index will do
        per_dv = []
        for dv in range(-(kw - 1), kw):
            band = torch.diagonal(win, offset=dv, dim1=2, dim2=4)  # (groups, e + 1, Cg, Cg, Wp − |Δv|)
            band = F.pad(band.cumsum(-1), (1, 0))
            t0 = (jj + min(dv, 0)).clamp(0, band.shape[-1] - 1 - wo)  # the band's index of v = j
            per_dv.append((band[..., t0 + wo] - band[..., t0])[:, iu])  # (groups, kh, Cg, Cg, kw)
        per_du.append(torch.stack(per_dv, 1))
    table = torch.stack(per_du, 1)  # (groups, Δu, Δv + kw − 1, i, c, d, j)
    # gather each column pair (c,i,j), (d,i',j') with i' ≥ i from its (Δu, Δv) entry; the rest is the transpose
    i, j, i2, j2 = torch.meshgrid(ii, jj, ii, jj, indexing="ij")
    pairs = table[:, (i2 - i).clamp(min=0), j2 - j + kw - 1, i, :, :, j]  # (kh, kw, kh, kw, groups, Cg, Cg)
    gram = pairs.permute(4, 5, 0, 1, 6, 2, 3).reshape(groups, d, d)
    upper = _row_pairs_upper(kh, kw, cg, x.device)
    return torch.where(upper, gram, gram.transpose(1, 2))


def _row_pairs_upper(kh: int, kw: int, cg: int, device: torch.device) -> torch.Tensor:
    """(D, D) bool: column pairs whose second kernel row is at or below the first's (the ones computed)."""
    i = torch.arange(kh, device=device).reshape(1, kh, 1).expand(cg, kh, kw).reshape(-1)
    return i[None, :] >= i[:, None]


def conv_patch_sums(x: torch.Tensor, kernel: tuple[int, int], padding: tuple[int, int],
                    groups: int = 1) -> torch.Tensor:
    """(groups, 1, Cg·kh·kw): Xᵀ1, each patch column's sum over examples and output positions (box sums)."""
    kh, kw = kernel
    ph, pw = padding
    n, c, _, _ = x.shape
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    hp, wp = xp.shape[2], xp.shape[3]
    ho, wo = hp - kh + 1, wp - kw + 1
    cum = F.pad(xp.sum(0).cumsum(1).cumsum(2), (1, 0, 1, 0))  # (C, Hp+1, Wp+1)
    i = torch.arange(kh, device=x.device)[:, None]
    j = torch.arange(kw, device=x.device)[None, :]
    box = cum[:, i + ho, j + wo] - cum[:, i, j + wo] - cum[:, i + ho, j] + cum[:, i, j]  # (C, kh, kw)
    return box.reshape(groups, 1, -1)


def conv_stats(x: torch.Tensor, W: torch.Tensor, R: torch.Tensor, padding: tuple[int, int], groups: int,
               with_bias: bool) -> tuple[torch.Tensor, ...]:
    """The exact solve's sums for a stride-1 2-D conv block, without a patch matrix:
    (XᵀX (G, D, D), XᵀR (G, D, Og), Xᵀ1 (G, 1, D) or None, 1ᵀR (G, 1, Og) or None, rows), with R the residual
    (N, O, Ho, Wo). XᵀR is the convolution's weight gradient for the output gradient R, one aten op."""
    kernel = tuple(W.shape[2:])
    o = W.shape[0]
    gram = conv_gram(x, kernel, padding, groups)
    dw = torch.ops.aten.convolution_backward(R, x, W, None, [1, 1], list(padding), [1, 1], False, [0, 0], groups,
                                             [False, True, False])[1]
    rhs = dw.reshape(groups, o // groups, -1).transpose(1, 2)
    s = conv_patch_sums(x, kernel, padding, groups) if with_bias else None
    rb = R.sum((0, 2, 3)).reshape(groups, 1, o // groups) if with_bias else None
    rows = R.shape[0] * R.shape[2] * R.shape[3]
    return gram, rhs, s, rb, rows
