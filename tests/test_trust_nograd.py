"""torch.no_grad() and .detach() in forward: parameters eager autograd gives no gradient never move."""
import pytest
import torch
from torch import nn

from trust_oracle import assert_matches_sgd


class NoGradBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.d, self.e = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        a = torch.tanh(self.a(x))
        with torch.no_grad():
            h = self.d(a)  # eager: no gradient to d, and none to a through this path
        return self.e(torch.tanh(h) + a)


class DetachedBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.d, self.e = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        a = torch.tanh(self.a(x))
        side = (self.d(a) * self.scale).detach()
        return self.e(a + side)


class DetachedBlockOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.e = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x):
        return self.a(x).detach() + self.e(x)


MODELS = [(NoGradBlock, ("d.weight", "d.bias")), (DetachedBranch, ("d.weight", "d.bias", "scale")),
          (DetachedBlockOutput, ("a.weight", "a.bias"))]


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("make,frozen", MODELS, ids=[m.__name__ for m, _ in MODELS])
def test_unreachable_parameters_do_not_move(make, frozen, frontend):
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, dtype=torch.double), torch.randn(6, 2, dtype=torch.double)
    prog = assert_matches_sgd(make(), x, y, frozen=frozen, frontend=frontend)
    blocks = {b.name for b in prog.blocks}
    assert not blocks & {f.rsplit(".", 1)[0] for f in frozen}
    assert not set(prog.nonblock) & set(frozen)
    assert any("get no gradient" in w for w in prog.warnings)


def test_nograd_region_exit_is_detached_in_graph():
    from lwcompile.passes.trace import trace
    res = trace(NoGradBlock(), (torch.randn(4, 3),), "fx")
    assert "d_no_grad" in {n.name for n in res.graph_module.graph.nodes}
