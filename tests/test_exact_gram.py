"""The exact conv solve with its normal equations summed over batch chunks (passes/exact_gram.py) equals the
solve on the whole patch matrix to float64 rounding, and holds less memory."""
import pytest
import torch

from lwcompile.config import Config
from lwcompile.ir import Block
from lwcompile.passes import exact_gram
from lwcompile.passes.exact_gram import plan_chunks
from lwcompile.passes.exact_solver import _conv_chunks, make_exact_fn
from lwcompile.passes.linear_ops import LINEAR_OPS


def _block(nd, groups, bias, frozen=()):
    k = (3,) * nd
    attrs = (("dilation", (1,) * nd), ("groups", groups), ("padding", (1,) * nd), ("stride", (2,) + (1,) * (nd - 1)))
    space = (9, 7, 5)[:nd]
    x_shape, w_shape = (6, 4, *space), (6, 4 // groups, *k)
    with torch.device("meta"):
        z = LINEAR_OPS[f"conv{nd}d"].apply(torch.empty(x_shape), torch.empty(w_shape),
                                           torch.empty(6) if bias else None, dict(attrs))
    return Block("c", "c", f"conv{nd}d", attrs, "identity", (), "c.weight", "c.bias" if bias else None, w_shape,
                 (6,) if bias else None, x_shape, tuple(z.shape), 1, frozen=frozenset(frozen))


def _solve(block, cfg, preact, budget, monkeypatch):
    monkeypatch.setattr(exact_gram, "CHUNK_ELEMENTS", budget)
    g = torch.Generator().manual_seed(3)
    W = torch.randn(block.weight_shape, generator=g, dtype=torch.float64)
    b = [torch.randn(block.bias_shape, generator=g, dtype=torch.float64)] if block.bias else []
    x = torch.randn(block.input_shape, generator=g, dtype=torch.float64)
    t = torch.randn(block.output_shape, generator=g, dtype=torch.float64)
    z = [LINEAR_OPS[block.op].apply(x, W, b[0] if b else None, dict(block.attrs))] if preact else []
    return make_exact_fn(block, cfg, preact_given=preact)(W, *b, x, t, torch.tensor(0.0, dtype=torch.float64), *z)


@pytest.mark.parametrize("nd,groups,bias", [(2, 1, True), (2, 1, False), (2, 2, True), (1, 1, True), (3, 1, False)])
@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("preact", [False, True])
def test_chunked_normal_equations_equal_the_whole_patch_matrix(monkeypatch, nd, groups, bias, relative, preact):
    block = _block(nd, groups, bias)
    cfg = Config(target="gd_pre", local_loss="squared_pre", inner_optimizer="exact", prox=0.3, prox_relative=relative)
    x, t, W = (torch.empty(s) for s in (block.input_shape, block.output_shape, block.weight_shape))
    monkeypatch.setattr(exact_gram, "CHUNK_ELEMENTS", 40)
    assert len(_conv_chunks(block.op, dict(block.attrs), x, t, W, True, bias, 0.3)) == 6  # one example each
    whole = _solve(block, cfg, preact, 10 ** 9, monkeypatch)
    chunked = _solve(block, cfg, preact, 40, monkeypatch)  # one example per chunk
    assert len(whole) == len(chunked) == 1 + bias
    for a, c in zip(whole, chunked):
        assert not torch.equal(a, torch.zeros_like(a))
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-13)


def test_chunks_cover_the_batch_and_respect_the_budget():
    for batch, rows, cols, g, budget in ((256, 196, 400, 1, 4 * 2 ** 20), (7, 10, 3, 2, 100), (5, 10, 10, 1, 1)):
        chunks = plan_chunks(batch, rows, cols, g, budget)
        assert [s for s, _ in chunks] == list(range(0, batch, chunks[0][1]))
        assert sum(n for _, n in chunks) == batch
        assert all(n == 1 or g * n * rows * cols <= budget for _, n in chunks)


def test_chunked_graph_holds_less_than_the_patch_matrix(monkeypatch):
    """The traced exact graph of the MNIST CNN's second conv at batch 256: its largest intermediate is a chunk."""
    from lwcompile.passes.inner import build_inner_graph, inner_example
    attrs = (("dilation", (1, 1)), ("groups", 1), ("padding", (2, 2)), ("stride", (1, 1)))
    blk = Block("c", "c", "conv2d", attrs, "relu", (), "c.weight", "c.bias", (32, 16, 5, 5), (32,),
                (256, 16, 14, 14), (256, 32, 14, 14), 1)
    cfg = Config(target="gd_pre", local_loss="squared_pre", inner_optimizer="exact", prox=1.0, prox_relative=True)
    gm = build_inner_graph(blk, cfg, inner_example(blk, cfg))
    biggest = max(n.meta["val"].numel() for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor))
    assert biggest <= exact_gram.CHUNK_ELEMENTS < 256 * 196 * 400
