"""Forward hooks and pre-hooks are compiled (traced through), unsupported hooks refused, later ones guarded."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcompile
from lwcompile.errors import LwcompileError, TraceError
from trust_oracle import assert_matches_sgd


def _mlp():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


HOOKS = {
    "linear_forward": lambda m: m[0].register_forward_hook(lambda mod, a, out: out * 2),
    "activation_pre": lambda m: m[1].register_forward_pre_hook(lambda mod, a: (a[0] + 1,)),
    "root_pre": lambda m: m.register_forward_pre_hook(lambda mod, a: (a[0] * 3,)),
    "root_forward": lambda m: m.register_forward_hook(lambda mod, a, out: out * 3),
    "pre_with_kwargs": lambda m: m[2].register_forward_pre_hook(lambda mod, a, kw: ((a[0] * 0.5,), kw),
                                                                with_kwargs=True),
    "forward_kwargs_always": lambda m: m[0].register_forward_hook(lambda mod, a, kw, out: out + 1,
                                                                  with_kwargs=True, always_call=True),
}


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", sorted(HOOKS))
def test_hook_is_compiled(name, frontend):
    torch.manual_seed(0)
    m = _mlp()
    HOOKS[name](m)
    x, y = torch.randn(6, 3, dtype=torch.double), torch.randn(6, 2, dtype=torch.double)
    prog = assert_matches_sgd(m, x, y, frontend=frontend)
    assert [b.name for b in prog.blocks] == ["0", "2"]


def test_backward_hook_refused():
    m = _mlp()
    m[0].register_full_backward_hook(lambda mod, gi, go: None)
    with pytest.raises(TraceError, match="'0'.*backward hook"):
        lwcompile.transform(m, F.mse_loss, (torch.randn(4, 3),))


def test_global_hook_refused():
    h = torch.nn.modules.module.register_module_forward_hook(lambda mod, a, out: None)
    try:
        with pytest.raises(TraceError, match="register_module_forward_hook"):
            lwcompile.transform(_mlp(), F.mse_loss, (torch.randn(4, 3),))
    finally:
        h.remove()


def test_hook_added_after_transform_retraces():
    torch.manual_seed(0)
    m = _mlp().double()
    x, y = torch.randn(6, 3, dtype=torch.double), torch.randn(6, 2, dtype=torch.double)
    prog = lwcompile.transform(m, F.mse_loss, (x,))
    m[0].register_forward_hook(lambda mod, a, out: out * 2)
    with torch.no_grad():
        want = float(F.mse_loss(m(x), y))
    assert prog.check_guards()
    assert abs(prog.compute_targets(x, y)["loss"].item() - want) < 1e-12


def test_global_hook_added_after_transform_refused():
    x = torch.randn(4, 3)
    prog = lwcompile.transform(_mlp(), F.mse_loss, (x,))
    h = torch.nn.modules.module.register_module_forward_hook(lambda mod, a, out: None)
    try:
        with pytest.raises(LwcompileError):
            prog.step(x, torch.randn(4, 2))
    finally:
        h.remove()
