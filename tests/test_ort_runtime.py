"""ACCEPTANCE: a compiled program exported with ``prog.export_onnx(dir)`` trains from the files alone.

For an MLP (MSE), a CNN (Conv + BatchNorm2d in train mode + ReLU + MaxPool + Linear, cross-entropy) and a
TransformerEncoderLayer (MSE), each built through ``lwcompile.transform`` and exported right away (no step, no
example labels: they are inferred from the loss):
- every exported graph (the target graph, every inner-update graph) run in onnxruntime matches the PyTorch graph
  to 1e-5 relative on fresh random inputs (not the trace inputs), at the example's batch size and at another one
  (every graph has a dynamic batch dimension);
- 5 training steps run entirely from ONNX (``OrtProgram``) end with the weights and buffers of 5 ``prog.step``
  calls on a deep copy of the model (same config, same data), to 1e-4 relative; ``write_back`` puts them into a
  fresh model; further steps on a partial and a larger batch give ``prog.step``'s loss to 1e-5 relative;
- a program exported after k steps continues from its state (inner and outer optimizer states) to 1e-5 on the
  loss; ``OrtProgram.state_dict()`` saved with torch.save and loaded (weights_only=True) into a fresh run continues
  identically, and a state from another export is refused.
And: the onnxruntime-training inner loop equals ``prog.step`` for inner_optimizer="gd"; the numpy outer optimizers
equal torch.optim; ``lwcompile export`` writes such a directory; an unexportable model raises ExportError naming the
op and the graph and leaves nothing behind. Each model is exported once (module-scoped fixtures).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcompile
from lwcompile.cli_export import add_parser, load_export_factory, run
from lwcompile.errors import ConfigError, ExportError, LwcompileError
from lwcompile.passes.inner import build_inner_graph, inner_example
from lwcompile.runtime.ort import OrtProgram
from lwcompile.runtime.ort_optim import make_numpy_optimizer
from test_onnx_export import assert_matches, examples_from_meta, fresh_like

TRAIN_RTOL = 1e-4
LOSS_RTOL = 1e-5
STEPS = 5


# ------------------------------------------------------------------------------------------------ the models
def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 3))


def _cnn() -> nn.Module:
    # the conv has no bias, as usual before BatchNorm: BatchNorm cancels it, so its gradient is float round-off,
    # which an adaptive inner optimizer would blow up to full-size, implementation-dependent steps
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).train()


def _tfm() -> nn.Module:
    return nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)


@dataclass
class Case:
    build: Callable[[], nn.Module]
    x: Callable[[torch.Generator], torch.Tensor]
    y: Callable[[torch.Generator], torch.Tensor]
    loss: Callable
    config: lwcompile.Config


CASES = {
    "mlp": Case(_mlp, lambda g: torch.randn(10, 6, generator=g), lambda g: torch.randn(10, 3, generator=g),
                F.mse_loss, lwcompile.Config(steps=3, inner_optimizer="adam", inner_lr=1e-3, outer_optimizer="adam")),
    "cnn": Case(_cnn, lambda g: torch.randn(4, 3, 8, 8, generator=g), lambda g: torch.randint(0, 5, (4,), generator=g),
                F.cross_entropy, lwcompile.Config(steps=3, inner_optimizer="rmsprop", inner_lr=1e-3,
                                                  outer_optimizer="adam", outer_lr=1e-2)),
    # eps=1e-3: the attention's key bias has a zero gradient in exact arithmetic (softmax ignores a shift common
    # to all keys); with a tiny eps, Adam turns its float round-off into ±lr steps that differ between any two
    # float32 implementations
    "tfm": Case(_tfm, lambda g: torch.randn(2, 5, 16, generator=g), lambda g: torch.randn(2, 5, 16, generator=g),
                F.mse_loss, lwcompile.Config(steps=3, inner_optimizer="adam", inner_lr=1e-3, eps=1e-3,
                                             outer_optimizer="adam", outer_lr=1e-3)),
}


@dataclass
class Exported:
    name: str
    case: Case
    prog: lwcompile.Program
    twin: nn.Module  # a deep copy of the model before any step
    data: list
    out: Path
    manifest: dict


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory) -> Exported:
    case = CASES[request.param]
    torch.manual_seed(0)
    model = case.build()
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    data = [(case.x(g), case.y(g)) for _ in range(STEPS)]
    prog = lwcompile.transform(model, case.loss, (data[0][0],), case.config)
    out = tmp_path_factory.mktemp(request.param) / "onnx"
    man = prog.export_onnx(str(out))  # right after transform: the labels follow from the loss
    return Exported(request.param, case, prog, twin, data, out, man)


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12))


# ------------------------------------------------------------------------------------------------ every graph
def test_every_exported_graph_matches_torch_on_fresh_inputs(exported):
    prog, man, out = exported.prog, exported.manifest, exported.out
    files = {f["name"]: f for f in man["files"]}
    # target graph: fresh parameters, buffers, inputs and labels (positive running variances, valid classes)
    ins = [i["name"] for i in files["target"]["inputs"]]
    outs = [o["name"] for o in files["target"]["outputs"] if not o["name"].startswith("new__")]
    fix = {i: (lambda g, t: torch.rand(t.shape, generator=g) + 0.5) for i, n in enumerate(ins) if "running_var" in n}
    if exported.name == "cnn":
        fix[len(ins) - 1] = lambda g, t: torch.randint(0, 5, t.shape, generator=g)
    fix0 = dict(fix)
    flat = fresh_like(examples_from_meta(prog.target_graph), 11, fix)
    assert_matches(prog.target_graph, flat, str(out / files["target"]["file"]), ins, outs)
    # inner graphs: fresh weights, x, target; a small positive lr and positive optimizer state (second moments)
    for b in prog.blocks:
        iins, iouts = prog.inner_signature(b.name).names()
        gm = prog.inner_graph(b.name)
        fix = {iins.index("lr"): lambda g, t: torch.tensor(1e-2)}
        fix |= {i: (lambda g, t: torch.rand(t.shape, generator=g) + 0.1)
                for i, n in enumerate(iins) if n.startswith("state")}
        fresh = fresh_like(examples_from_meta(gm), 12, fix)
        assert_matches(gm, fresh, str(out / files[f"inner/{b.name}"]["file"]), iins, iouts)
    # another batch size: the same files against the graphs torch traces for it
    g = torch.Generator().manual_seed(5)
    x, y = exported.case.x(g), exported.case.y(g)
    x, y = torch.cat([x, x[:1]]), torch.cat([y, y[:1]])  # one row more than the example
    other = prog.build_target_graph(y, x)
    flat = fresh_like(examples_from_meta(other), 13, {k: f for k, f in fix0.items()})
    assert_matches(other, flat, str(out / files["target"]["file"]), ins, outs)
    out_node = next(n for n in other.graph.nodes if n.op == "output")
    shape = {k: tuple(v.meta["val"].shape) for k, v in zip(prog.target_signature.output_names, out_node.args[0])}
    for b in prog.blocks:  # (the batch need not be the first dimension: attention projections see (seq, batch, ·))
        iins, iouts = prog.inner_signature(b.name).names()
        reuse = "preact" in iins  # the exported graphs take â as the program's do (Config.reuse_preactivation)
        example = list(inner_example(b, prog.config, 1, preact=reuse))
        k = iins.index("x")
        example[k:k + 2] = [torch.zeros(shape[f"block_input:{b.name}"]), torch.zeros(shape[f"target:{b.name}"])]
        if reuse:
            example[iins.index("preact")] = torch.zeros(shape[f"target:{b.name}"])
        gm = build_inner_graph(b, prog.config, tuple(example), preact=reuse, offset="offset" in iins)
        fix = {iins.index("lr"): lambda g, t: torch.tensor(1e-2)}
        fix |= {i: (lambda g, t: torch.rand(t.shape, generator=g) + 0.1)
                for i, n in enumerate(iins) if n.startswith("state")}
        assert_matches(gm, fresh_like(examples_from_meta(gm), 14, fix), str(out / files[f"inner/{b.name}"]["file"]),
                       iins, iouts)


def test_manifest_holds_everything_needed_to_train(exported):
    prog, man, out = exported.prog, exported.manifest, exported.out
    p = json.loads((out / "manifest.json").read_text())["program"]
    assert lwcompile.Config(**p["config"]) == exported.case.config
    assert p["inner"]["optimizer"] == exported.case.config.inner_optimizer and p["inner"]["steps"] == 3
    assert p["outer"]["params"] == list(prog.nonblock) == p["nonblock"]
    target_inputs = [i["name"] for i in man["files"][0]["inputs"]]
    t = p["target"]
    assert target_inputs == t["params"] + t["buffers"] + t["inputs"] + t["labels"]
    with np.load(out / p["params_file"]) as z:
        for name, t in prog.model.named_parameters():
            np.testing.assert_array_equal(z[name], t.detach().numpy())
    with np.load(out / p["buffers_file"]) as z:
        assert sorted(z.files) == sorted(n for n, _ in prog.model.named_buffers())
    assert [b["name"] for b in p["blocks"]] == [b.name for b in prog.blocks]
    with np.load(out / p["inner"]["state_file"]) as z:
        for b, blk in zip(p["blocks"], prog.blocks):
            assert b["params"] == list(blk.params)
            assert (out / b["file"]).is_file() and (out / b["training"] / "training_model.onnx").is_file()
            assert b["inputs"][:len(blk.params)] == ["weight", "bias"][:len(blk.params)]
            for k, s in zip(b["state"], prog.inner_state[blk.name]):
                np.testing.assert_array_equal(z[k], s.numpy())


# ------------------------------------------------------------------------------------------------ training
def test_five_steps_from_onnx_equal_prog_step_and_write_back(exported):
    run_ = OrtProgram(exported.out)
    prog = lwcompile.transform(exported.twin, exported.case.loss, (exported.data[0][0],), exported.case.config)
    for x, y in exported.data:
        got = run_.step(x.numpy(), y.numpy())
        ref = prog.step(x, y)
        assert abs(got - ref) <= TRAIN_RTOL * abs(ref)
    state = exported.twin.state_dict()
    for name, v in run_.weights().items():
        assert _rel_err(v, state[name].numpy()) <= TRAIN_RTOL, name
    start = exported.prog.model.state_dict()  # the exported program itself never stepped
    assert all(not np.allclose(v, start[n].numpy()) for n, v in run_.params.items())
    torch.manual_seed(123)
    fresh = exported.case.build()
    run_.write_back(fresh)
    for name, t in fresh.state_dict().items():
        np.testing.assert_array_equal(t.numpy(), run_.weights()[name])
    x, y = exported.data[0]
    n = max(x.shape[0] // 2, 1) + 1  # a partial last batch, then a larger one
    for xb, yb in [(x[:n], y[:n]), (torch.cat([x, x[:n]]), torch.cat([y, y[:n]]))]:
        got, ref = run_.step(xb.numpy(), yb.numpy()), prog.step(xb, yb)
        assert abs(got - ref) <= LOSS_RTOL * abs(ref), (xb.shape, got, ref)


@pytest.mark.parametrize("exported", ["cnn"], indirect=True)  # BatchNorm buffers and outer-optimizer state
def test_export_after_steps_continues_where_the_program_was(exported, cli_export, tmp_path):
    model = copy.deepcopy(exported.prog.model)  # the exported program never stepped: its model is as built
    prog = lwcompile.transform(model, exported.case.loss, (exported.data[0][0],), exported.case.config)
    for x, y in exported.data[:2]:
        prog.step(x, y)
    man = prog.export_onnx(str(tmp_path / "later"), training=False)
    assert man["program"]["outer"]["state_file"] == "outer_state.npz" and man["program"]["step_count"] == 2
    run_ = OrtProgram(tmp_path / "later")
    x, y = exported.data[2]
    for xb, yb in [(x, y), (x[:3], y[:3])]:  # the example's batch, then a partial one
        got, ref = run_.step(xb, yb), prog.step(xb, yb)
        assert abs(got - ref) <= LOSS_RTOL * abs(ref)
    # save, load into a fresh run of the same files (torch.load with weights_only=True), continue identically
    torch.save(run_.state_dict(), tmp_path / "state.pt")
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    assert saved["step_count"] == 4 and set(saved["outer_state"]) == set(prog.nonblock)
    again = OrtProgram(tmp_path / "later")
    again.load_state_dict(saved)
    for x, y in exported.data[3:]:
        a, b, ref = run_.step(x, y), again.step(x, y), prog.step(x, y)
        assert a == b and abs(a - ref) <= LOSS_RTOL * abs(ref)
    state = model.state_dict()
    for name, v in run_.weights().items():
        assert _rel_err(v, state[name].numpy()) <= TRAIN_RTOL, name
        np.testing.assert_array_equal(again.weights()[name], v)
    # a state from another export, or with another shape, is refused before anything changes
    with pytest.raises(LwcompileError, match="fingerprint"):
        OrtProgram(cli_export[0]).load_state_dict(saved)
    bad = copy.deepcopy(saved)
    name = next(iter(bad["params"]))
    bad["params"][name] = bad["params"][name][:1]
    before = again.weights()
    with pytest.raises(LwcompileError, match="nothing was loaded"):
        again.load_state_dict(bad)
    assert all(np.array_equal(v, again.weights()[k]) for k, v in before.items())
    assert again.step_count == saved["step_count"] + len(exported.data[3:])


def test_an_exported_program_continues_its_inner_lr_schedule(tmp_path):
    """The schedule is a pure function of step_count (Config fields), so the files continue it: each step's
    loss equals prog.step's while the warm-up changes the inner lr every step."""
    case = CASES["mlp"]
    cfg = case.config.replace(inner_optimizer="gd", inner_lr=0.05, inner_lr_warmup_steps=4,
                              inner_lr_warmup_start=0.25, inner_lr_anneal="linear", inner_lr_anneal_steps=3)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = [(case.x(g), case.y(g)) for _ in range(7)]
    prog = lwcompile.transform(case.build(), case.loss, (data[0][0],), cfg)
    for x, y in data[:2]:
        prog.step(x, y)
    prog.export_onnx(str(tmp_path / "sched"), training=False)
    run_ = OrtProgram(tmp_path / "sched")
    lrs = []
    for x, y in data[2:]:
        lrs.append(run_.effective_inner_lr)
        assert lrs[-1] == pytest.approx(prog.effective_inner_lr, rel=1e-12)
        got, ref = run_.step(x, y), prog.step(x, y)
        assert abs(got - ref) <= LOSS_RTOL * abs(ref)
    assert len(set(lrs)) >= 3  # the schedule really moved during the comparison


@pytest.mark.parametrize("exported", ["mlp"], indirect=True)  # inner Adam
def test_adam_training_artifacts_equal_prog_step_and_refuse_a_started_state(exported, tmp_path):
    # export's default artifact optimizer for inner Adam: onnxruntime's AdamW in torch mode, no weight decay
    assert {t["optimizer"] for t in exported.manifest["training"]} == {"adam"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact pair: no "different method" warning
        run_ = OrtProgram(exported.out, inner="training")
    model = copy.deepcopy(exported.prog.model)  # as exported: the exported program never stepped
    prog = lwcompile.transform(model, exported.case.loss, (exported.data[0][0],), exported.case.config)
    x, y = exported.data[0]
    for xb, yb in [*exported.data[:3], (x[:7], y[:7])]:  # the example's batch, then a partial one
        got, ref = run_.step(xb.numpy(), yb.numpy()), prog.step(xb, yb)
        assert abs(got - ref) <= LOSS_RTOL * abs(ref)
    state = model.state_dict()
    for name, v in run_.params.items():
        assert _rel_err(v, state[name].numpy()) <= TRAIN_RTOL, name
    with pytest.raises(LwcompileError, match="onnxruntime"):
        run_.state_dict()  # AdamW's moments live inside onnxruntime
    # a directory whose exported Adam state is not the initial one: onnxruntime cannot be given it
    started = tmp_path / "started"
    shutil.copytree(exported.out, started)
    with np.load(started / "inner_state.npz") as z:
        arrays = {k: np.ones_like(z[k]) for k in z.files}
    np.savez(started / "inner_state.npz", **arrays)
    with pytest.raises(LwcompileError, match="starts at zero"):
        OrtProgram(started, inner="training")
    assert OrtProgram(started).inner_state  # the inner graphs continue from it


# ------------------------------------------------------------------------------------- the CLI + ORT training
FACTORY = '''
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)), torch.randn(8, 5)

def make4():
    model, x = make()
    return model, x, torch.nn.functional.cross_entropy, torch.zeros(8, dtype=torch.long)
'''


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory) -> tuple[Path, argparse.Namespace]:
    d = tmp_path_factory.mktemp("cli")
    (d / "lw_cli_factory.py").write_text(FACTORY)
    parser = argparse.ArgumentParser(prog="lwcompile")
    add_parser(parser.add_subparsers(dest="command"))
    out = d / "out"
    args = parser.parse_args(["export", f"{d / 'lw_cli_factory.py'}:make", str(out), "--steps", "3",
                              "--inner-optimizer", "gd", "--inner-lr", "0.05", "--devices", "2"])
    assert run(args) == 0
    return out, args


def test_cli_export_writes_a_trainable_directory(cli_export, tmp_path):
    out, args = cli_export
    p = json.loads((out / "manifest.json").read_text())["program"]
    assert p["config"]["steps"] == 3 and p["config"]["inner_optimizer"] == "gd" and p["inner"]["lr"] == 0.05
    assert sorted(b["device"] for b in p["blocks"]) == ["sim:0", "sim:1"]
    assert p["target"]["labels"] == ["label:0"] and len(p["blocks"]) == 2  # MSE against labels shaped like the output
    model, x, loss, labels = load_export_factory(f"{out.parent / 'lw_cli_factory.py'}:make4")
    assert loss is F.cross_entropy and labels[0].dtype == torch.long
    bad = argparse.Namespace(**{**vars(args), "factory": "no_such_module_xyz:make", "out_dir": str(tmp_path / "o")})
    assert run(bad) == 1 and not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="local-loss"):
        from lwcompile.cli_export import _loss
        _loss("matching")


@pytest.mark.parametrize("decay", [False, True])
def test_training_artifact_inner_loop_equals_prog_step_for_gd(cli_export, decay):
    out, _ = cli_export
    run_ = OrtProgram(out, inner="training")
    assert run_.mode == "training" and all(b.get("training") for b in run_.program["blocks"])  # every block: ORT-training
    steps = run_.program["inner"]["steps"]  # the artifacts take the lr per step: METHOD.md's decay is a schedule
    run_.program["inner"]["lr_factors"] = [max(1 - k / steps, 0.25) if decay else 1.0 for k in range(steps)]
    model, x0, _, _ = load_export_factory(f"{out.parent / 'lw_cli_factory.py'}:make")
    cfg = lwcompile.Config(**run_.config).replace(inner_lr_decay=decay)
    prog = lwcompile.transform(model, F.mse_loss, x0, cfg)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x, y = torch.randn(8, 5, generator=g), torch.randn(8, 2, generator=g)
        assert abs(run_.step(x.numpy(), y.numpy()) - prog.step(x, y)) <= TRAIN_RTOL
    x, y = torch.randn(5, 5, generator=g), torch.randn(5, 2, generator=g)  # a partial batch: dynamic artifacts
    got, ref = run_.step(x.numpy(), y.numpy()), prog.step(x, y)
    assert abs(got - ref) <= LOSS_RTOL * abs(ref)
    state = model.state_dict()
    for name, v in run_.params.items():
        assert _rel_err(v, state[name].numpy()) <= TRAIN_RTOL, name


# ------------------------------------------------------------------------------------------------ pieces
@pytest.mark.parametrize("name,opts", [("sgd", {}), ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
                                       ("momentum", {"dampening": 0.2}), ("adam", {}),
                                       ("adam", {"amsgrad": True, "weight_decay": 0.1}), ("adamw", {}),
                                       ("rmsprop", {}), ("rmsprop", {"momentum": 0.9, "centered": True})])
def test_numpy_outer_optimizers_equal_torch_optim(name, opts):
    torch_opt = {"sgd": torch.optim.SGD, "momentum": torch.optim.SGD, "adam": torch.optim.Adam,
                 "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}[name]
    p = torch.randn(4, 3)
    tp = p.clone().requires_grad_()
    ref = torch_opt([tp], lr=1e-2, **(({"momentum": 0.9} if name == "momentum" else {}) | opts))
    opt = make_numpy_optimizer(name, 1e-2, opts)
    params = {"w": p.numpy().copy()}
    for k in range(6):
        grad = torch.randn(4, 3) * 10.0 ** (k % 3 - 1)
        tp.grad = grad.clone()
        ref.step()
        params = opt.step(params, {"w": grad.numpy()})
    np.testing.assert_allclose(params["w"], tp.detach().numpy(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError, match="unknown option"):
        make_numpy_optimizer(name, 1e-2, {"bogus": 1})


class _QR(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.linalg.qr(self.a(x))[0])  # QR has no ONNX translation


def test_unexportable_model_raises_naming_op_and_graph_and_leaves_nothing(tmp_path):
    prog = lwcompile.transform(_QR(), F.mse_loss, torch.randn(6, 4))
    with pytest.raises(ExportError, match=r"(?s)graph 'target'.*linalg_qr"):
        prog.export_onnx(str(tmp_path / "out"), example_labels=torch.randn(6, 2))
    assert os.listdir(tmp_path) == []
