"""``torch.addmm(bias, x, W)`` (HF GPT-2's Conv1D) and ``torch.baddbmm`` with a parameter weight are blocks.

Oracles: eager PyTorch for the row's math (its ``apply`` is the call, its ``weight_grad`` autograd's), the float64 SGD
identity for whole models (T=1 GD of step η equals torch.optim.SGD(lr=ηγ)), onnxruntime vs torch for export. Before
this row, the GPT-2 replica had a single block (the tied head) and every projection went silently to the outer optimizer.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcompile
from lwcompile.config import PAIRS
from lwcompile.passes import registry
from real_zoo import gpt2
from test_real_zoo import _config, _load, _sgd_reference, _snapshot, identity_problems

D = torch.float64


def _identity(model, inputs, y, loss_fn, target="gd_pre"):
    before = _snapshot(model)
    ref, ref_loss = _sgd_reference(model, inputs, y, loss_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = lwcompile.transform(model, loss_fn, inputs, _config(target, {}))
    loss = prog.step(inputs, y)
    assert loss == pytest.approx(ref_loss, rel=1e-12, abs=1e-12)
    problems = identity_problems(before, model, ref)
    assert not problems, "; ".join(problems)
    return prog


def test_gpt2_conv1d_projections_are_blocks_and_step_like_sgd():
    model, inputs, y, loss_fn = _load("gpt2")
    prog = _identity(model, inputs, y, loss_fn)
    proj = [f"h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert [b.name for b in prog.blocks] == proj + ["wte"]
    assert all(b.op == "addmm" and b.bias == b.name + ".bias" for b in prog.blocks[:-1])
    assert {b.weight_shape for b in prog.blocks[:2]} == {(8, 24), (8, 8)}  # (in, out), as Conv1D stores it
    # the projections train with their local losses: none is left to the outer optimizer
    assert not any(n.startswith("h.") and ("c_attn" in n or "c_proj" in n or "c_fc" in n) for n in prog.partition.nonblock)


class _Calls(nn.Module):
    """addmm in its spellings (function with α/β, tensor method, transposed weight) and baddbmm with a 3-D weight."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(5, 6)), nn.Parameter(torch.randn(6))
        self.w2, self.b2 = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(1, 4))
        self.w3, self.b3 = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3))  # used as W3.t()
        self.w4, self.b4 = nn.Parameter(torch.randn(2, 3, 2)), nn.Parameter(torch.randn(2, 1, 2))

    def forward(self, x):
        h = torch.tanh(torch.addmm(self.b1, x, self.w1, beta=0.5, alpha=2.0))
        h = torch.sigmoid(self.b2.addmm(h, self.w2))
        h = torch.addmm(self.b3, h, self.w3.t())
        h = torch.baddbmm(self.b4, h.view(2, -1, 3), self.w4, alpha=0.7)  # (2, N/2, 3) @ (2, 3, 2)
        return h.reshape(-1, 2)


def test_every_spelling_is_a_block_with_the_calls_math_and_steps_like_sgd():
    torch.manual_seed(0)
    model, x, y = _Calls().to(D), torch.randn(6, 5, dtype=D), torch.randn(6, 2, dtype=D)
    for target in PAIRS:
        prog = _identity(model, (x,), y, F.mse_loss, target)
    assert [(b.name, b.op, b.transfer) for b in prog.blocks] == [
        ("w1", "addmm", "tanh"), ("w2", "addmm", "sigmoid"), ("w3", "linear", "identity"), ("w4", "baddbmm", "identity")]
    assert dict(prog.blocks[0].attrs) == {"alpha": 2.0, "beta": 0.5, "bias_shape": (6,)}
    assert dict(prog.blocks[3].attrs)["bias_shape"] == (2, 1, 2)
    assert prog.partition.nonblock == ()


@pytest.mark.parametrize("fn,x,w,b,kw", [
    (torch.addmm, (7, 5), (5, 3), (3,), {}),
    (torch.addmm, (7, 5), (5, 3), (1, 3), {"beta": -0.5, "alpha": 3.0}),
    (torch.ops.aten.addmm.default, (7, 5), (5, 3), (7, 3), {"alpha": 0.5}),
    (torch.baddbmm, (2, 7, 5), (2, 5, 3), (3,), {"beta": 2.0}),
    (torch.baddbmm, (2, 7, 5), (2, 5, 3), (2, 1, 3), {}),
])
def test_the_rows_apply_and_weight_gradient_are_torchs(fn, x, w, b, kw):
    row = registry.linear_for_call("call_function", fn)
    x, W, B = (torch.randn(s, dtype=D) for s in (x, w, b))
    attrs = dict(row.call_attrs(tuple(W.shape), [tuple(B.shape)], kw))
    W.requires_grad_(True), B.requires_grad_(True)
    z = fn(B, x, W, **kw)
    torch.testing.assert_close(row.apply(x, W, B, attrs), z, rtol=1e-12, atol=1e-12)
    r = torch.randn_like(z)
    gW, gB = torch.autograd.grad(z, (W, B), r)
    dW, dB = row.weight_grad(x, r, tuple(W.shape), attrs, True)
    torch.testing.assert_close(dW, gW, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dB, gB, rtol=1e-12, atol=1e-12)
    assert registry.linear_for_call("call_method", row.name) is row


def test_a_parameter_feeding_a_matmul_outside_any_block_is_warned_about():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.w = nn.Parameter(torch.randn(2, 4, 3))  # a batched weight through torch.bmm: no row for it
            self.proj = nn.Parameter(torch.randn(4, 3))
            self.head = nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(x).view(2, -1, 4)
            return self.head(torch.einsum("bnk,jk->bnj", torch.bmm(h, self.w), self.proj).reshape(-1, 4))

    m = M()
    prog = lwcompile.transform(m, F.mse_loss, (torch.randn(6, 4),))
    assert [b.name for b in prog.blocks] == ["fc", "head"]
    said = [w for w in prog.warnings if "matmul-like" in w]
    assert len(said) == 2 and "'w'" in said[0] and "bmm" in said[0] and "'proj'" in said[1] and "einsum" in said[1]
    # a block's parameters, and parameters the user skipped, are not warned about
    prog = lwcompile.transform(m, F.mse_loss, (torch.randn(6, 4),), lwcompile.Config(skip=("fc",)))
    assert not any("'fc." in w for w in prog.warnings)


def test_an_addmm_with_a_bias_that_is_no_parameter_is_said_and_trained_by_the_outer_optimizer():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3))
            self.fc = nn.Linear(3, 2)
            self.register_buffer("b", torch.randn(3))

        def forward(self, x):
            return self.fc(torch.addmm(self.b, x, self.w))

    torch.manual_seed(0)
    m, x, y = M().to(D), torch.randn(5, 4, dtype=D), torch.randn(5, 2, dtype=D)
    prog = _identity(m, (x,), y, F.mse_loss)
    assert [b.name for b in prog.blocks] == ["fc"] and prog.partition.nonblock == ("w",)
    assert any("bias that is not a parameter" in w for w in prog.warnings)


def test_an_addmm_block_exports_to_onnx_and_runs_like_torch(tmp_path):
    from lwcompile.passes.onnx_training import export_training_artifacts
    from lwcompile.runtime.ort import OrtTrainingBlock
    torch.manual_seed(0)
    w, b, x, t = torch.randn(5, 6) * 0.5, torch.randn(6), torch.randn(8, 5), torch.randn(8, 6)
    attrs = {"alpha": 1.0, "beta": 1.0, "bias_shape": (6,)}
    export_training_artifacts("addmm", w, b, x, t, "tanh", "matching", 0.2, "sgd", str(tmp_path / "a"), attrs=attrs)
    got = OrtTrainingBlock(str(tmp_path / "a")).train(x, t, steps=3, lr=0.01)
    W, B = w.double().clone().requires_grad_(), b.double().clone().requires_grad_()
    for _ in range(3):
        z = torch.addmm(B, x.double(), W)
        loss = (torch.log(torch.cosh(z)).sum() - (t.double() * z).sum()
                + 0.1 * (((W - w.double()) ** 2).sum() + ((B - b.double()) ** 2).sum()))
        gW, gB = torch.autograd.grad(loss, [W, B])
        with torch.no_grad():
            W -= 0.01 * gW
            B -= 0.01 * gB
    for name, ref in (("weight", W), ("bias", B)):
        r = ref.detach().numpy()
        assert np.abs(got[name] - r).max() <= 1e-4 * np.abs(r).max(), name


def test_a_compiled_conv1d_model_exports_its_graphs(tmp_path):
    """A Conv1D (addmm) model's program exports (a tied GPT-2 head is refused by export.py, by name, as before)."""
    from real_zoo import Conv1D
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(6, 4), nn.Tanh(), Conv1D(3, 6))
    x, y = torch.randn(2, 5, 4), torch.randn(2, 5, 3)
    prog = lwcompile.transform(model, F.mse_loss, (x,), lwcompile.Config(steps=2, inner_optimizer="rmsprop"))
    prog.step(x, y)
    assert [(b.name, b.op) for b in prog.blocks] == [("0", "addmm"), ("2", "addmm")]
    man = prog.export_onnx(str(tmp_path / "out"), devices={b.name: "cpu" for b in prog.blocks})
    assert [t["block"] for t in man["training"]] == ["0", "2"]
