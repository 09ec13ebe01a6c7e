"""ONNX that travels: an export needs no training step and runs any batch size.

- Example labels follow from PyTorch's standard losses (module and functional forms), or are given once to
  ``lwcompile.transform(..., example_labels=)``; an unknown loss without them is refused with a clear error.
- ``lwcompile export --loss cross_entropy`` exports class-index (int64) labels by itself.
- The exported target graph, run in onnxruntime at a batch size other than the example's, equals the graph torch
  traces for that batch (the oracle) to 1e-5 relative.
- A model that fixes the batch size (a literal size in a reshape), or a loss that branches on it, is refused,
  naming the batch-size guard and where it came from, and nothing is written.
- Inner graphs read each optimizer slot from its own input (Adam's m and v, RMSprop's mean square and momentum),
  checked against the eager function they are traced from.
"""
from __future__ import annotations

import argparse
import functools
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcompile
from lwcompile.cli_export import add_parser, run
from lwcompile.errors import ConfigError, ExportError
from lwcompile.labels import infer_example_labels, label_kind
from test_onnx_export import assert_matches, examples_from_meta, fresh_like


@pytest.mark.parametrize("loss,kind", [
    (F.mse_loss, "float"), (nn.L1Loss(), "float"), (F.smooth_l1_loss, "float"), (nn.HuberLoss(), "float"),
    (nn.BCELoss(), "float"), (F.binary_cross_entropy_with_logits, "float"), (nn.CrossEntropyLoss(), "index"),
    (functools.partial(F.cross_entropy, label_smoothing=0.1), "index"), (nn.NLLLoss(), "index"),
    (lambda out, y: (out - y).pow(2).sum(), None)])
def test_labels_follow_from_standard_losses(loss, kind):
    assert label_kind(loss) == kind
    m = nn.Conv1d(2, 3, 1)  # output (N, C=3, L=5): class indices drop dim 1
    labels = infer_example_labels(m, (torch.randn(4, 2, 5),), loss)
    if kind is None:
        assert labels is None
    else:
        want = (torch.float32, (4, 3, 5)) if kind == "float" else (torch.int64, (4, 5))
        assert (labels[0].dtype, tuple(labels[0].shape)) == want
        assert torch.isfinite(loss(torch.sigmoid(m(torch.randn(4, 2, 5))), labels[0]))  # the loss accepts them


def _cli(tmp_path, *extra: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="lwcompile")
    add_parser(parser.add_subparsers(dest="command"))
    out = str(tmp_path / "out")
    return run(parser.parse_args(["export", "lwcompile.cli_export:demo_factory", out, *extra])), out


def test_cli_cross_entropy_exports_class_indices_and_the_target_graph_runs_any_batch(tmp_path):
    rc, out = _cli(tmp_path, "--loss", "cross_entropy", "--no-training", "--steps", "2")
    assert rc == 0
    man = json.loads(open(os.path.join(out, "manifest.json")).read())
    label = man["files"][0]["inputs"][-1]
    assert label == {"name": "label:0", "shape": ["batch"], "dtype": "int64"}
    assert all(f["inputs"][-1]["shape"][0] == "batch" or f["kind"] == "inner" for f in man["files"])
    model, x = lwcompile.cli_export.demo_factory()
    prog = lwcompile.transform(model, F.cross_entropy, x, steps=2)
    for batch in (32, 7):  # the example's, and another
        gm = prog.build_target_graph(torch.zeros(batch, dtype=torch.long), torch.zeros(batch, 8))
        sig = prog.target_signature
        flat = fresh_like(examples_from_meta(gm), batch, {len(sig.input_names) - 1:
                                                        lambda g, t: torch.randint(0, 4, t.shape, generator=g)})
        assert_matches(gm, flat, os.path.join(out, "target.onnx"), sig.input_names, sig.output_names)


def test_transform_example_labels_serve_an_unknown_loss(tmp_path):
    def loss(out, y):
        return (out - y).abs().pow(3).mean()

    m = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(ExportError, match="example_labels"):
        lwcompile.transform(m, loss, torch.randn(6, 3)).export_onnx(str(tmp_path / "a"), training=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ConfigError, match="example_labels"):
        lwcompile.transform(m, loss, torch.randn(6, 3), example_labels=[[1.0]])
    prog = lwcompile.transform(m, loss, torch.randn(6, 3), example_labels=torch.zeros(6, 2), steps=2)
    assert prog.example_labels[0].shape == (6, 2)
    man = prog.export_onnx(str(tmp_path / "b"), training=False)
    assert man["files"][0]["inputs"][-1]["shape"] == ["batch", 2]
    gm = prog.build_target_graph(torch.zeros(9, 2), torch.zeros(9, 3))  # another batch size
    sig = prog.target_signature
    assert_matches(gm, fresh_like(examples_from_meta(gm), 0), str(tmp_path / "b" / "target.onnx"),
                   sig.input_names, sig.output_names)


class _FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        return self.fc(x).reshape(8, 3, 2).sum(1)  # the literal 8 is the example's batch size


def _batch_dependent_loss(out, y):
    return F.mse_loss(out, y) if out.shape[0] > 8 else F.l1_loss(out, y)  # a branch on the batch size


def test_a_model_or_loss_that_fixes_the_batch_size_is_refused(tmp_path):
    prog = lwcompile.transform(_FixedBatch(), F.mse_loss, torch.randn(8, 4))
    assert np.isfinite(prog.step(torch.randn(8, 4), torch.randn(8, 2)))  # torch trains it at that batch
    with pytest.raises(ExportError, match=r"'target' cannot be made batch-dynamic.*fixed the batch size to 8.*'reshape'"):
        prog.export_onnx(str(tmp_path / "out"))
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    prog = lwcompile.transform(m, _batch_dependent_loss, torch.randn(16, 3), example_labels=torch.zeros(16, 2))
    with pytest.raises(ExportError, match=r"batch-dynamic.*> 8.*in _batch_dependent_loss"):
        prog.export_onnx(str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("opt,opts", [("adam", {}), ("rmsprop", {"momentum": 0.9})])
def test_inner_graph_reads_each_optimizer_slot_from_its_own_input(opt, opts):
    # Adam's init returns one zeros tensor for m and v; traced as one placeholder, the graph read v for m (caught
    # when the batch-dynamic ONNX graphs, traced on separate fakes, disagreed with prog.step from the second step)
    from lwcompile.passes.inner import make_inner_fn

    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    prog = lwcompile.transform(m, F.mse_loss, torch.randn(5, 3), steps=2, inner_optimizer=opt, **opts)
    b = prog.blocks[0]
    for preact in (False, True):  # the graph without and with the forward pass's pre-activation as an input
        gm = prog.inner_graph(b.name, preact=preact)
        g = torch.Generator().manual_seed(0)
        args = [torch.rand(t.shape, generator=g) + 0.1 for t in examples_from_meta(gm)]
        want = make_inner_fn(b, prog.config, preact, offset=True)(*[t.clone() for t in args])  # eager: what it traced
        for got, ref in zip(gm(*args), want):
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
