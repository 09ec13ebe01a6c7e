"""Op kinds are rows: a linear op's row reads a call's or a module's attributes so that its ``apply`` is the call
(eager PyTorch is the oracle), and Config's names, spaces and pairs are the local-loss rows' (METHOD.md's table)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcompile
from lwcompile.errors import ConfigError
from lwcompile.passes import registry
from lwcompile.passes.linear_ops import LINEAR_OPS

torch.manual_seed(0)
X1, X2 = torch.randn(2, 4, 11, dtype=torch.float64), torch.randn(2, 4, 7, 8, dtype=torch.float64)
CALLS = [  # (function, x, W shape, positional attribute args after bias, keyword args)
    (F.linear, torch.randn(3, 5, dtype=torch.float64), (6, 5), [], {}),
    (torch.conv1d, X1, (6, 2, 3), [2, 1, 2, 2], {}),
    (torch.conv2d, X2, (6, 4, 3, 3), [], {"padding": "same", "dilation": (2, 1)}),
    (torch.conv2d, X2, (6, 2, 3, 2), [(2, 1), 0], {"groups": 2}),
    (torch.conv_transpose2d, X2, (4, 3, 3, 2), [2, 1, (1, 0)], {"dilation": 1}),
    (torch.ops.aten.conv2d.padding, X2, (6, 4, 3, 3), [[1, 1], "same", [2, 1], 1], {}),
]


@pytest.mark.parametrize("fn,x,w_shape,args,kwargs", CALLS)
def test_a_rows_attributes_read_from_a_call_make_apply_equal_that_call(fn, x, w_shape, args, kwargs):
    row = registry.linear_for_call("call_function", fn)
    W, b = torch.randn(w_shape, dtype=torch.float64), torch.randn(w_shape[0], dtype=torch.float64)
    if row.name.startswith("conv_transpose"):
        b = torch.randn(w_shape[1], dtype=torch.float64)
    attrs = row.call_attrs(tuple(W.shape), args, kwargs)
    torch.testing.assert_close(row.apply(x, W, b, dict(attrs)), fn(x, W, b, *args, **kwargs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mod", [nn.Conv1d(4, 6, 3, stride=2, padding=2, padding_mode="reflect"),
                                 nn.Conv1d(4, 6, 3, padding="same", dilation=2, groups=2, padding_mode="circular"),
                                 nn.ConvTranspose1d(4, 2, 3, stride=2, padding=1, output_padding=1), nn.Linear(11, 3)])
def test_a_rows_attributes_read_from_a_module_make_apply_equal_the_module(mod):
    mod = mod.double()
    row = registry.linear_for_module(mod)
    attrs = row.module_attrs(mod)
    with torch.no_grad():
        torch.testing.assert_close(row.apply(X1, mod.weight, mod.bias, dict(attrs)), mod(X1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in LINEAR_OPS if n.startswith("conv")])
def test_default_attributes_are_the_default_call(name):
    row, nd = LINEAR_OPS[name], int(name[-2])
    w_shape = ((4, 3) if name.startswith("conv_transpose") else (3, 4)) + (2,) * nd  # 4 input channels
    x, W = torch.randn((2, 4) + (6,) * nd, dtype=torch.float64), torch.randn(w_shape, dtype=torch.float64)
    torch.testing.assert_close(row.apply(x, W, None, dict(row.default_attrs)), row.functions[0](x, W), rtol=1e-12,
                               atol=1e-12)


def test_asymmetric_same_padding_cannot_be_a_block():
    assert LINEAR_OPS["conv2d"].call_attrs((6, 4, 4, 3), [], {"padding": "same"}) is None


def test_config_validates_the_local_loss_rows_as_method_md_pairs_them():
    pairs = {"gd_pre": "squared_pre", "dual_md_pre": "dual_bregman", "gd_post": "squared_post", "md_post": "matching"}
    assert lwcompile.config.PAIRS == pairs  # METHOD.md's table
    for target, loss in pairs.items():
        lwcompile.Config(target=target, local_loss=loss)
        other = next(l for t, l in pairs.items() if l != loss and (t.endswith("_pre") != target.endswith("_pre")))
        with pytest.raises(ConfigError, match=f"use the METHOD.md pair local_loss='{loss}'"):
            lwcompile.Config(target=target, local_loss=other)
