"""Backward ops rewritten into forward ops, for ONNX export: ``EXTRA_DECOMPOSITIONS`` (aten op -> function).

torch 2.13's dynamo exporter (onnxscript's torchlib) cannot translate several backward ops that a training graph
holds, and some of its translations are wrong for training graphs. :mod:`lwcompile.passes.onnx_decomp` applies this
table (over its own) when it re-traces a graph for export:

- ``convolution_backward``: a transposed convolution for the input, a convolution of x by the output gradient for
  the weight (and the adjoint pair for transposed convolutions); it is the conv rows' ``onnx_decompositions`` in
  :mod:`lwcompile.passes.linear_ops` (each linear-op row brings the decompositions its gradient needs);
- the CPU flash-attention backward (``_scaled_dot_product_flash_attention_for_cpu_backward``): softmax recomputed;
- ``avg_pool2d_backward`` (a grouped transposed convolution by ones) and ``_adaptive_avg_pool2d_backward`` (two
  averaging matrices);
- torch's own decompositions of ``native_batch_norm`` (its running-stat updates become explicit) and ``nll_loss_*``
  (torchlib's ``total_weight`` is wrong).

Register a decomposition for another op by adding it to ``EXTRA_DECOMPOSITIONS`` before the first export.

Example:
    >>> import torch
    >>> x, w, gy = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), torch.randn(1, 3, 3, 3)
    >>> args = (gy, x, w, [3], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, True])
    >>> ours = EXTRA_DECOMPOSITIONS[aten.convolution_backward.default](*args)
    >>> all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, aten.convolution_backward.default(*args)))
    True
"""
from __future__ import annotations

from typing import Any

import torch
import torch._decomp

from lwcompile.passes.linear_ops import LINEAR_OPS

aten = torch.ops.aten


def _conv(x, w, stride, padding, dilation, transposed=False, output_padding=None, groups=1):
    nd = x.dim() - 2
    return aten.convolution.default(x, w, None, list(stride), list(padding), list(dilation), transposed,
                                    list(output_padding or [0] * nd), groups)


def _sdpa_cpu_backward(grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, attn_mask=None,
                       scale=None):
    if dropout_p != 0.0:
        raise NotImplementedError("scaled_dot_product_attention backward with dropout_p > 0 (its random mask is "
                                  "not recoverable); trace with dropout=0.0")
    if key.shape[-3] != query.shape[-3]:
        raise NotImplementedError("scaled_dot_product_attention backward with grouped-query heads")
    e = query.shape[-1]
    s = (1.0 / e ** 0.5) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * s
    if is_causal:
        lq, lk = query.shape[-2], key.shape[-2]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(keep.logical_not(), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(attn_mask.logical_not(), float("-inf"))
        else:
            scores = scores + attn_mask
    p = torch.softmax(scores, dim=-1)
    gv = p.transpose(-2, -1) @ grad_out
    gp = grad_out @ value.transpose(-2, -1)
    gs = p * (gp - (gp * p).sum(-1, keepdim=True))
    gq = (gs @ key) * s
    gk = (gs.transpose(-2, -1) @ query) * s
    return gq, gk, gv


def _avg_pool2d_backward(grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                         divisor_override):
    if ceil_mode:
        raise NotImplementedError("avg_pool2d backward with ceil_mode=True")
    kh, kw = (list(kernel_size) * 2)[:2] if len(kernel_size) == 1 else list(kernel_size)
    stride = list(stride) or [kh, kw]
    stride = (stride * 2)[:2] if len(stride) == 1 else stride
    padding = (list(padding) * 2)[:2] if len(padding) == 1 else list(padding)
    c = input.shape[1]
    ones_k = torch.ones(c, 1, kh, kw, dtype=grad_output.dtype, device=grad_output.device)
    if divisor_override:
        g = grad_output / divisor_override
    elif count_include_pad:
        g = grad_output / (kh * kw)
    else:
        cnt = _conv(torch.ones_like(input[:1, :1]), ones_k[:1], stride, padding, [1, 1])
        g = grad_output / cnt
    op = []
    for d, kk in enumerate((kh, kw)):
        full = (grad_output.shape[2 + d] - 1) * stride[d] - 2 * padding[d] + kk
        op.append(input.shape[2 + d] - full)
    return _conv(g, ones_k, stride, padding, [1, 1], True, op, c)


def _adaptive_matrix(n_in, n_out, like):
    """A (n_out, n_in) with A[i, j] = 1/len_i for j in window i = [⌊i·n/m⌋, ⌈(i+1)·n/m⌉)."""
    i = torch.arange(n_out, device=like.device)
    j = torch.arange(n_in, device=like.device)
    start = (i * n_in) // n_out
    end = ((i + 1) * n_in + n_out - 1) // n_out
    inside = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
    return inside.to(like.dtype) / (end - start).to(like.dtype)[:, None]


def _adaptive_avg_pool2d_backward(grad_output, input):
    ah = _adaptive_matrix(input.shape[-2], grad_output.shape[-2], grad_output)
    aw = _adaptive_matrix(input.shape[-1], grad_output.shape[-1], grad_output)
    return ah.transpose(0, 1) @ grad_output @ aw


# the linear-op rows' own (convolution_backward, from the conv rows of lwcompile.passes.linear_ops), then these
EXTRA_DECOMPOSITIONS: dict[Any, Any] = {
    **{op: fn for row in LINEAR_OPS.values() for op, fn in row.onnx_decompositions.items()},
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: _sdpa_cpu_backward,
    aten.avg_pool2d_backward.default: _avg_pool2d_backward,
    aten._adaptive_avg_pool2d_backward.default: _adaptive_avg_pool2d_backward,
}
# native_batch_norm's schema says "functional" but it updates running_mean/var in place; torch's decomposition
# routes it through _native_batch_norm_legit (declared mutable), which functionalize then makes explicit.
# nll_loss_forward: torchlib's translation returns a wrong total_weight (its second output), which
# nll_loss_backward divides by; torch's decomposition computes it.
for _op in (aten.native_batch_norm.default, aten._native_batch_norm_legit.default,
            aten._native_batch_norm_legit.no_stats, aten.nll_loss_forward.default, aten.nll_loss2d_forward.default,
            aten.nll_loss_backward.default, aten.nll_loss2d_backward.default):
    if _op in torch._decomp.decomposition_table:
        EXTRA_DECOMPOSITIONS[_op] = torch._decomp.decomposition_table[_op]
