"""Inner graphs shared across shapes (passes/inner_share.py): the same numbers as per-shape graphs, fewer traces.

Oracles: per-shape graphs (the sharing switched off) bit for bit, eager float64 SGD (the T=1 identity), and
re-tracing: a conv kind's graph code is the same at other sizes, and a graph whose code depends on a size is not
shared.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcompile
from lwcompile.config import Config
from lwcompile.ir import Block
from lwcompile.passes import inner_share
from lwcompile.passes.inner import build_inner_graph, inner_example
from lwcompile.passes.inner_share import SharedInnerGraphs, share_key

ATTRS2 = (("dilation", (1, 1)), ("groups", 1), ("padding", (1, 1)), ("stride", (2, 2)))


def _net() -> nn.Module:
    """Convs of one kind (3x3 stride 1, ReLU) at three widths and two spatial sizes, plus 1x1 convs and BatchNorm."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6), nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 7, 1), nn.Tanh(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(7, 3))


def _batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 3, (4,), generator=g)


def _no_sharing(monkeypatch):
    monkeypatch.setattr(inner_share, "share_key", lambda *a, **k: None)


@pytest.mark.parametrize("cfg", [Config(), Config(steps=2, inner_optimizer="adam", inner_lr=1e-2),
                                 Config(steps=3, inner_optimizer="momentum", reuse_preactivation=False)],
                         ids=["default", "adam", "momentum-no-preact"])
def test_shared_graphs_give_the_per_shape_numbers_bitwise(monkeypatch, cfg):
    x, y = _batch()
    shared_m = _net()
    shared = lwcompile.transform(shared_m, F.cross_entropy, (x,), cfg)
    losses = [shared.step(x, y) for _ in range(2)]
    assert shared._shared_inner.traces + len(shared._inner_cache) < len(shared.blocks)  # something was shared
    _no_sharing(monkeypatch)
    own_m = _net()
    own = lwcompile.transform(own_m, F.cross_entropy, (x,), cfg)
    assert [own.step(x, y) for _ in range(2)] == losses
    assert len(own._inner_cache) == len({(b.weight_shape, b.input_shape, b.transfer, b.attrs) for b in own.blocks})
    for (k, v), w in zip(shared_m.state_dict().items(), own_m.state_dict().values()):
        assert torch.equal(v, w), k


def test_shared_graphs_keep_the_sgd_identity_in_float64():
    eta, gamma = 0.05, 0.5
    x, y = _batch(torch.float64)
    model = _net().double()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=eta * gamma)
    F.cross_entropy(ref(x), y).backward()
    opt.step()
    cfg = Config(target="gd_pre", local_loss="squared_pre", gamma=gamma, steps=1, inner_optimizer="gd",
                 inner_lr=eta, outer_optimizer="sgd", outer_lr=eta * gamma)
    prog = lwcompile.transform(model, F.cross_entropy, (x,), cfg)
    prog.step(x, y)
    assert prog._shared_inner.traces + len(prog._inner_cache) < len(prog.blocks)
    for (n, p), r in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-13, msg=n)


def _conv(name, w, x, z, attrs=ATTRS2, transfer="relu", bias=True, op="conv2d"):
    return Block(name, name, op, attrs, transfer, (), f"{name}.weight", f"{name}.bias" if bias else None, w,
                 (w[0],) if bias else None, x, z, 1)


@pytest.mark.parametrize("cfg", [Config(), Config(inner_optimizer="adam"), Config(inner_optimizer="gd", prox=0.5)],
                         ids=["default", "adam", "gd-prox"])
@pytest.mark.parametrize("preact", [False, True])
def test_conv_graph_code_is_the_same_at_other_sizes(cfg, preact):
    a = _conv("a", (8, 4, 3, 3), (2, 4, 9, 9), (2, 8, 5, 5))
    b = _conv("b", (5, 7, 3, 3), (3, 7, 12, 10), (3, 5, 6, 5))
    c = _conv("c", (6, 2, 3), (2, 2, 11), (2, 6, 6), attrs=(("dilation", (1,)), ("groups", 1), ("padding", (1,)),
                                                           ("stride", (2,))), op="conv1d", bias=False)
    d = _conv("d", (3, 6, 3), (5, 6, 20), (5, 3, 10), attrs=c.attrs, op="conv1d", bias=False)
    for p, q in ((a, b), (c, d)):
        gp, gq = (build_inner_graph(k, cfg, inner_example(k, cfg, preact=preact), preact=preact) for k in (p, q))
        assert gp.code == gq.code
        assert share_key(p, cfg, p.input_shape, p.output_shape, torch.float32, preact) == \
            share_key(q, cfg, q.input_shape, q.output_shape, torch.float32, preact)


def test_a_graph_with_a_size_in_its_code_is_not_shared():
    # a stand-in tracer whose "graph" bakes the input's channel count in (as a reshape constant would)
    class Fake:
        def __init__(self, xs):
            self.code = f"reshape(-1, {xs[1]})"

    shared = SharedInnerGraphs(Config(), trace=lambda block, dtype, xs, ts, preact, offset=True: Fake(xs))
    a = _conv("a", (8, 4, 3, 3), (2, 4, 9, 9), (2, 8, 5, 5))
    b = _conv("b", (8, 6, 3, 3), (2, 6, 9, 9), (2, 8, 5, 5))
    c = _conv("c", (8, 4, 3, 3), (3, 4, 7, 7), (3, 8, 4, 4))
    ga = shared.get(a, torch.float32, a.input_shape, a.output_shape, False)
    gb = shared.get(b, torch.float32, b.input_shape, b.output_shape, False)
    assert gb is not ga and gb.code == "reshape(-1, 6)" and shared.traces == 3  # a, the sentinel check, b
    gc = shared.get(c, torch.float32, c.input_shape, c.output_shape, False)
    assert gc is not ga and gc.code == "reshape(-1, 4)" and shared.traces == 4  # checked once per kind


def test_sizes_one_and_other_kinds_are_not_shared():
    cfg = Config()
    a = _conv("a", (8, 4, 3, 3), (2, 4, 9, 9), (2, 8, 5, 5))
    one = _conv("o", (8, 4, 3, 3), (1, 4, 9, 9), (1, 8, 5, 5))  # batch 1: code may specialise on it
    key = lambda k, c=cfg: share_key(k, c, k.input_shape, k.output_shape, torch.float32, False)  # noqa: E731
    assert key(a) != key(one)
    assert key(a, Config(inner_optimizer="exact", target="gd_pre", local_loss="squared_pre", prox=1.0)) is None
    grouped = _conv("g", (8, 2, 3, 3), (2, 4, 9, 9), (2, 8, 5, 5), attrs=tuple(
        (k, 2 if k == "groups" else v) for k, v in ATTRS2))
    assert key(grouped) is None
    lin = Block("l", "l", "linear", (), "relu", (), "l.weight", None, (3, 4), None, (2, 4), (2, 3), 1)
    assert key(lin) is None
