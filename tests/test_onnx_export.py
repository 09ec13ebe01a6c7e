"""ONNX export of emitted graphs and onnxruntime-training artifacts, checked against torch.

Graphs are built here with make_fx (the way the compiler builds them): forward + torch.autograd.grad of a task
loss (MLP, CNN with BatchNorm in train mode, TransformerEncoderLayer) and unrolled RMSProp inner loops (linear,
conv2d). onnxruntime's outputs must match the GraphModule's on fresh inputs (not the trace inputs).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from lwcompile.errors import ExportError
from lwcompile.passes.linear_ops import LINEAR_OPS
from lwcompile.passes.onnx_export import (MUTATED_PREFIX, GraphExport, TrainingExport, examples_from_meta,
                                          export_graph_module, export_onnx_dir)
from lwcompile.passes.onnx_training import export_training_artifacts
from lwcompile.passes.transfer import TRANSFERS
from lwcompile.runtime.ort import OrtGraph, OrtTrainingBlock

RTOL = 1e-5
# Absolute floor for outputs that are zero in exact arithmetic (a conv bias feeding BatchNorm has gradient 0;
# both sides then hold float32 round-off ~1e-7). Every other output here has scale ~0.1..10.
ATOL = 1e-6


# ------------------------------------------------------------------------------------------ graph builders
def grad_graph(model: nn.Module, loss_fn, x, y):
    """make_fx of (params..., buffers..., x, y) -> (loss, *grads); BatchNorm buffers are mutated in place."""
    names = [n for n, _ in model.named_parameters()]
    bnames = [n for n, _ in model.named_buffers()]
    params = [p.detach().clone() for p in model.parameters()]
    bufs = [b.detach().clone() for b in model.buffers()]

    def fn(*args):
        ps = [p.requires_grad_() for p in args[:len(params)]]
        bs = args[len(params):len(params) + len(bufs)]
        xx, yy = args[len(params) + len(bufs):]
        state = dict(zip(names, ps)) | dict(zip(bnames, bs))
        loss = loss_fn(torch.func.functional_call(model, state, (xx,)), yy)
        return (loss, *torch.autograd.grad(loss, ps))

    inputs = (*params, *bufs, x, y)
    gm = make_fx(fn, tracing_mode="fake")(*inputs)
    in_names = [n.replace(".", "_") for n in names + bnames] + ["x", "y"]
    out_names = ["loss"] + ["grad_" + n.replace(".", "_") for n in names]
    return gm, inputs, in_names, out_names


def rmsprop_inner_graph(op: str, w, b, x, a, attrs, steps=3, decay=0.9, eps=1e-8, prox=0.1):
    """Unrolled inner loop: `steps` RMSProp iterations on ½Σ‖op(x;W)−a‖² + (λ/2)‖W−W0‖² (closed-form gradients)."""
    lin = LINEAR_OPS[op]

    def fn(W, B, x, a, lr, vW, vB):
        W0, B0 = W, B
        for _ in range(steps):
            r = lin.apply(x, W, B, attrs) - a
            gW, gB = lin.weight_grad(x, r, W.shape, attrs, True)
            gW, gB = gW + prox * (W - W0), gB + prox * (B - B0)
            vW = decay * vW + (1 - decay) * gW * gW
            vB = decay * vB + (1 - decay) * gB * gB
            W = W - lr * gW / (torch.sqrt(vW) + eps)
            B = B - lr * gB / (torch.sqrt(vB) + eps)
        return W, B, vW, vB

    inputs = (w, b, x, a, torch.tensor(1e-2), torch.zeros_like(w), torch.zeros_like(b))
    gm = make_fx(fn, tracing_mode="fake")(*inputs)
    return gm, inputs, ["W", "b", "x", "target", "lr", "vW", "vb"], ["new_W", "new_b", "new_vW", "new_vb"]


def fresh_like(inputs, seed, fix=None):
    """Inputs of the same shapes and dtypes, drawn again (float: normal; int: kept)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, t in enumerate(inputs):
        if fix and i in fix:
            out.append(fix[i](g, t))
        elif t.is_floating_point():
            out.append(torch.randn(t.shape, generator=g, dtype=t.dtype))
        else:
            out.append(t.clone())
    return out


def assert_matches(gm, inputs, path, in_names, out_names):
    """Run torch (on clones, which it may mutate) and onnxruntime on `inputs`; compare every output."""
    ref_in = [t.clone() for t in inputs]
    ref = gm(*ref_in)
    g = OrtGraph(path)
    assert g.input_names == list(in_names)
    got = g.run_named(*inputs)
    assert list(got)[:len(out_names)] == list(out_names)
    pairs = list(zip(out_names, ref))
    for name in list(got)[len(out_names):]:  # mutated inputs: compare with the torch tensor after the call
        assert name.startswith(MUTATED_PREFIX)
        pairs.append((name, ref_in[in_names.index(name[len(MUTATED_PREFIX):])]))
    assert len(got) == len(pairs)
    for name, r in pairs:
        o = torch.from_numpy(np.asarray(got[name]))
        assert o.shape == r.shape and o.dtype == r.dtype, name
        if not r.is_floating_point():
            assert torch.equal(o, r), name
            continue
        scale = float(r.abs().max()) if r.numel() else 0.0
        err = float((o - r).abs().max()) if r.numel() else 0.0
        assert err <= RTOL * scale + ATOL, f"{path}:{name}: max err {err:.3g}, scale {scale:.3g}"
    return got


# ------------------------------------------------------------------------------------------ graph export
def test_mlp_tanh_sigmoid_xent(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
    loss = lambda o, t: F.binary_cross_entropy_with_logits(o, t, reduction="sum") / o.shape[0]  # noqa: E731
    gm, inputs, ins, outs = grad_graph(m, loss, torch.randn(4, 8), torch.rand(4, 8))
    p = str(tmp_path / "mlp.onnx")
    model = export_graph_module(gm, inputs, p, ins, outs)
    assert model.ir_version <= 10 and max(o.version for o in model.opset_import if o.domain == "") <= 21
    fresh = fresh_like(inputs, 1, {len(inputs) - 1: lambda g, t: torch.rand(t.shape, generator=g)})
    assert_matches(gm, fresh, p, ins, outs)


def test_cnn_batchnorm_train_relu_maxpool_xent(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 2 * 2, 5))
    m.train()
    gm, inputs, ins, outs = grad_graph(m, F.cross_entropy, torch.randn(3, 3, 8, 8), torch.randint(0, 5, (3,)))
    p = str(tmp_path / "cnn.onnx")
    model = export_graph_module(gm, inputs, p, ins, outs)
    outputs = [o.name for o in model.graph.output]
    # the in-place running-stat updates come back as extra outputs
    assert outputs[len(outs):] == [MUTATED_PREFIX + n for n in
                                   ("1_running_mean", "1_running_var", "1_num_batches_tracked")]
    iv = ins.index("1_running_var")
    fresh = fresh_like(inputs, 2, {iv: lambda g, t: torch.rand(t.shape, generator=g) + 0.5,
                                   len(inputs) - 1: lambda g, t: torch.randint(0, 5, t.shape, generator=g)})
    got = assert_matches(gm, fresh, p, ins, outs)
    assert not np.allclose(got[MUTATED_PREFIX + "1_running_mean"], fresh[ins.index("1_running_mean")].numpy())
    # run_torch(write_back=True) reproduces the in-place semantics
    bufs = [t.clone() for t in fresh]
    res = OrtGraph(p).run_torch(*bufs, write_back=True)
    assert len(res) == len(outs)
    ref_in = [t.clone() for t in fresh]
    gm(*ref_in)
    assert torch.allclose(bufs[iv], ref_in[iv], rtol=1e-5, atol=1e-6)


def test_transformer_encoder_layer_mse(tmp_path):
    torch.manual_seed(0)
    m = nn.TransformerEncoderLayer(d_model=16, nhead=2, dropout=0.0, batch_first=True, dim_feedforward=32)
    gm, inputs, ins, outs = grad_graph(m, F.mse_loss, torch.randn(2, 5, 16), torch.randn(2, 5, 16))
    p = str(tmp_path / "tfm.onnx")
    export_graph_module(gm, inputs, p, ins, outs)
    assert_matches(gm, fresh_like(inputs, 3), p, ins, outs)


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_rmsprop_inner_loop(tmp_path, op):
    torch.manual_seed(0)
    if op == "linear":
        attrs = {}
        w, b, x = torch.randn(6, 5), torch.randn(6), torch.randn(7, 5)
        a = torch.randn(7, 6)
    else:
        attrs = {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 1), "groups": 1}
        w, b, x = torch.randn(4, 3, 3, 3), torch.randn(4), torch.randn(2, 3, 7, 6)
        a = torch.randn(2, 4, 4, 4)
    gm, inputs, ins, outs = rmsprop_inner_graph(op, w, b, x, a, attrs)
    p = str(tmp_path / f"inner_{op}.onnx")
    export_graph_module(gm, inputs, p, ins, outs)
    fresh = fresh_like(inputs, 4, {4: lambda g, t: torch.tensor(3e-2),
                                   5: lambda g, t: torch.rand(t.shape, generator=g),
                                   6: lambda g, t: torch.rand(t.shape, generator=g)})
    got = assert_matches(gm, fresh, p, ins, outs)
    assert not np.allclose(got["new_W"], fresh[0].numpy())


def test_tiny_constants_survive_export(tmp_path):
    """onnxscript's optimizer takes ``x + 1e-8`` for ``x + 0``; Adam's eps must survive (0/0 = NaN otherwise)."""
    fn = lambda m, v: (m / (torch.sqrt(v) + 1e-8), v * (1 + 1e-9))  # noqa: E731
    inputs = (torch.zeros(3), torch.zeros(3))
    gm = make_fx(fn, tracing_mode="fake")(*inputs)
    export_graph_module(gm, inputs, str(tmp_path / "eps.onnx"), ["m", "v"], ["step", "v2"])
    step, _ = OrtGraph(str(tmp_path / "eps.onnx"))(np.zeros(3, np.float32), np.zeros(3, np.float32))
    assert np.array_equal(step, np.zeros(3, np.float32))


# ------------------------------------------------------------------------------------------ directory + failure
def _unexportable():
    # QR has no ONNX translation and no decomposition
    fn = lambda x: (torch.linalg.qr(x)[0] * 2,)  # noqa: E731
    x = torch.randn(4, 4)
    return make_fx(fn, tracing_mode="fake")(x), (x,)


def test_unexportable_graph_raises_and_leaves_nothing(tmp_path):
    gm, inputs = _unexportable()
    with pytest.raises(ExportError, match=r"(?s)qr_graph.*linalg_qr"):
        export_graph_module(gm, inputs, str(tmp_path / "qr.onnx"), graph_name="qr_graph")
    assert os.listdir(tmp_path) == []
    torch.manual_seed(0)
    ok, ok_in, ins, outs = grad_graph(nn.Linear(3, 2), F.mse_loss, torch.randn(4, 3), torch.randn(4, 2))
    out = tmp_path / "out"
    with pytest.raises(ExportError):
        export_onnx_dir(str(out), [GraphExport("good", ok, ok_in, ins, outs), GraphExport("bad_qr", gm, inputs)])
    assert os.listdir(tmp_path) == []  # neither out/ nor out.tmp-*


def test_export_dir_manifest(tmp_path):
    torch.manual_seed(0)
    gm, inputs, ins, outs = grad_graph(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), F.mse_loss,
                                       torch.randn(5, 3), torch.randn(5, 2))
    w, b, x, a = torch.randn(4, 3), torch.randn(4), torch.randn(5, 3), torch.randn(5, 4)
    igm, iin, iins, iouts = rmsprop_inner_graph("linear", w, b, x, a, {})
    out = tmp_path / "out"
    man = export_onnx_dir(str(out), [
        GraphExport("target", gm, inputs, ins, outs, kind="target", device="cpu"),
        GraphExport("inner/0", igm, iin, iins, iouts, block="0", kind="inner", device="cuda:1"),
    ], training=[TrainingExport("0", dict(block_op="linear", weight=w, bias=b, x_example=x, target_example=a,
                                          transfer="tanh", local_loss="matching", prox=0.0), device="cuda:1")])
    assert sorted(os.listdir(tmp_path)) == ["out"]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(man, default=str))
    f0, f1 = on_disk["files"]
    assert (f0["file"], f0["kind"], f0["device"]) == ("target.onnx", "target", "cpu")
    assert (f1["file"], f1["block"], f1["device"]) == ("inner_0.onnx", "0", "cuda:1")
    assert [i["name"] for i in f1["inputs"]] == iins and [o["name"] for o in f1["outputs"]] == iouts
    assert f1["inputs"][0] == {"name": "W", "shape": [4, 3], "dtype": "float"}
    assert f1["inputs"][4]["shape"] == []  # the 0-d learning rate
    tr = on_disk["training"][0]
    assert tr["block"] == "0" and tr["device"] == "cuda:1"
    for f in [x["file"] for x in on_disk["files"]] + tr["files"]:
        assert (out / f).is_file(), f
    # every file written is recorded, so a later export can tell its own files from a user's
    assert set(on_disk["written"]) == {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    # a previous export is replaced only when asked (tests/test_export_safety.py checks the refusals)
    with pytest.raises(ExportError, match="overwrite=True"):
        export_onnx_dir(str(out), [GraphExport("target", gm, inputs, ins, outs)])
    export_onnx_dir(str(out), [GraphExport("target", gm, inputs, ins, outs)], overwrite=True)
    assert sorted(os.listdir(out)) == ["manifest.json", "target.onnx"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ------------------------------------------------------------------------------------------ training artifacts
def _torch_local_loss(local_loss, transfer, z, t):
    tr = TRANSFERS[transfer]
    if local_loss == "squared_pre":
        return 0.5 * ((z - t) ** 2).sum()
    if local_loss == "squared_post":
        return 0.5 * ((tr.f(z, {}) - t) ** 2).sum()
    if local_loss == "matching":
        return tr.F(z, {}).sum() - (t * z).sum()
    return (tr.f(z, {}) * (z - t) - tr.F(z, {}) + tr.F(t, {})).sum()  # dual Bregman


@pytest.mark.parametrize("op,transfer,local_loss,prox", [
    ("linear", "tanh", "matching", 0.5),
    ("linear", "sigmoid", "dual_bregman", 0.0),
    ("linear", "identity", "squared_pre", 0.2),
    ("conv2d", "relu", "squared_post", 0.3),
])
def test_training_artifacts_sgd_match_torch_float64(tmp_path, op, transfer, local_loss, prox):
    torch.manual_seed(0)
    if op == "linear":
        attrs = {}
        w, b, x = torch.randn(6, 5) * 0.5, torch.randn(6), torch.randn(8, 5)
        zshape = (8, 6)
    else:
        attrs = {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1}
        w, b, x = torch.randn(4, 3, 3, 3) * 0.3, torch.randn(4), torch.randn(2, 3, 5, 5)
        zshape = (2, 4, 5, 5)
    t = torch.randn(zshape)
    if transfer == "sigmoid" and local_loss != "dual_bregman":
        t = torch.rand(zshape)
    d = tmp_path / "art"
    info = export_training_artifacts(op, w, b, x, t, transfer, local_loss, prox, "sgd", str(d), attrs=attrs)
    assert info["inputs"] == ["x", "target"] + (["weight_ref", "bias_ref"] if prox > 0 else [])
    blk = OrtTrainingBlock(str(d))
    steps, lr = 4, 0.01
    got = blk.train(x, t, steps=steps, lr=lr)

    W, B = w.double().clone().requires_grad_(), b.double().clone().requires_grad_()
    W0, B0, xd, td = w.double(), b.double(), x.double(), t.double()
    losses = []
    for _ in range(steps):
        z = LINEAR_OPS[op].apply(xd, W, B, attrs)
        loss = _torch_local_loss(local_loss, transfer, z, td)
        loss = loss + prox / 2 * (((W - W0) ** 2).sum() + ((B - B0) ** 2).sum())
        losses.append(loss.item())
        gW, gB = torch.autograd.grad(loss, [W, B])
        with torch.no_grad():
            W -= lr * gW
            B -= lr * gB
    for name, ref in (("weight", W), ("bias", B)):
        r = ref.detach().numpy()
        assert np.abs(got[name] - r).max() <= 1e-4 * np.abs(r).max(), name
    assert not np.allclose(got["weight"], w.numpy())
    np.testing.assert_allclose(blk.losses, losses, rtol=1e-4)

    # a second outer step: load new starting weights, keep going
    blk.set_params(weight=w, bias=b)
    again = blk.train(x, t, steps=steps, lr=lr)
    np.testing.assert_allclose(again["weight"], got["weight"], rtol=1e-5, atol=1e-6)


def test_training_artifacts_adamw_and_errors(tmp_path):
    torch.manual_seed(0)
    w, b, x, t = torch.randn(3, 4), torch.randn(3), torch.randn(5, 4), torch.randn(5, 3)
    opts = {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}
    info = export_training_artifacts("linear", w, None, x, t, "relu", "matching", 0.0, "adamw", str(tmp_path / "a"),
                                     optimizer_options=opts)
    assert info["params"] == ["weight"]
    blk = OrtTrainingBlock(str(tmp_path / "a"))
    steps, lr = 3, 1e-2
    new = blk.train(x, t, steps=steps, lr=lr)
    assert set(new) == {"weight"}
    # float64 reference of onnxruntime's AdamW (Hugging Face mode: eps outside the bias correction, decay after)
    W = w.double().clone().requires_grad_()
    m, v = torch.zeros_like(W), torch.zeros_like(W)
    (b1, b2), eps, wd = opts["betas"], opts["eps"], opts["weight_decay"]
    for k in range(1, steps + 1):
        z = x.double() @ W.T
        loss = TRANSFERS["relu"].F(z, {}).sum() - (t.double() * z).sum()
        (g,) = torch.autograd.grad(loss, [W])
        with torch.no_grad():
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            W -= lr * (1 - b2 ** k) ** 0.5 / (1 - b1 ** k) * m / (v.sqrt() + eps)
            W -= lr * wd * W
    r = W.detach().numpy()
    assert np.abs(new["weight"] - r).max() <= 1e-4 * np.abs(r).max()
    with pytest.raises(ExportError, match="optimizer"):
        export_training_artifacts("linear", w, b, x, t, "relu", "matching", 0.0, "lbfgs", str(tmp_path / "b"))
    with pytest.raises(ExportError, match="transfer"):
        export_training_artifacts("linear", w, b, x, t, "gelu", "matching", 0.0, "sgd", str(tmp_path / "c"))
    assert sorted(os.listdir(tmp_path)) == ["a"]


# ------------------------------------------------------------------------------------------ a compiled Program
def test_program_export_onnx(tmp_path):
    import lwcompile
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    prog = lwcompile.transform(m, F.cross_entropy, example_inputs=(x,),
                               config=lwcompile.Config(steps=2, inner_optimizer="rmsprop"))
    prog.step(x, y)
    man = prog.export_onnx(str(tmp_path / "out"), devices={b.name: "cpu" for b in prog.blocks})
    assert [f["kind"] for f in man["files"]] == ["target"] + ["inner"] * len(prog.blocks)
    assert [t["block"] for t in man["training"]] == [b.name for b in prog.blocks]
    ins = [i["name"] for i in man["files"][0]["inputs"]]
    outs = [o["name"] for o in man["files"][0]["outputs"]]
    flat = fresh_like(examples_from_meta(prog.target_graph), 9,
                      {len(ins) - 1: lambda g, t: torch.randint(0, 3, t.shape, generator=g)})
    assert_matches(prog.target_graph, flat, str(tmp_path / "out" / "target.onnx"), ins, outs)
    b = prog.blocks[0]
    iins, iouts = prog.inner_signature(b.name).names()  # with â when Config.reuse_preactivation, like the files
    gm = prog.inner_graph(b.name)
    fresh = fresh_like(examples_from_meta(gm), 10, {i: (lambda g, t: torch.rand(t.shape, generator=g))
                                                    for i in range(iins.index("lr"), len(iins))})
    assert_matches(gm, fresh, str(tmp_path / "out" / man["files"][1]["file"]), iins, iouts)
