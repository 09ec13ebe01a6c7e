"""Specification of the command line: ``lwcompile plan MODULE:FACTORY`` prints the plan and writes JSON / DOT / PNG."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from lwcompile.cli import main
from lwcompile.runtime.plan import Plan

FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    def build():
        model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
        return model, torch.randn(16, 6)

    def build_with_loss():
        model, x = build()
        return model, (x,), torch.nn.functional.mse_loss

    def broken():
        return "not a model"
""")


@pytest.fixture
def factory_file(tmp_path, monkeypatch):
    path = tmp_path / "my_models.py"
    path.write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return path


@pytest.mark.parametrize("mode", ["replicated", "partitioned"])
def test_plan_prints_the_table_and_writes_valid_json_and_dot(factory_file, tmp_path, capsys, mode):
    out_json, out_dot = tmp_path / "plan.json", tmp_path / "plan.dot"
    rc = main(["plan", "my_models:build", "--devices", "2", "--mode", mode, "--device-rate", "1e9",
               "--json", str(out_json), "--dot", str(out_dot)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{mode} plan: 3 blocks on 2 devices") and "makespan" in printed
    plan = Plan.from_json(out_json.read_text())
    assert json.loads(out_json.read_text())["mode"] == mode
    assert plan.devices == ("sim:0", "sim:1")
    assert sorted(b for bs in plan.assignment.values() for b in bs) == ["0", "2", "4"]
    dot = out_dot.read_text()
    assert dot.startswith("digraph plan {") and dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}") and dot.count("subgraph cluster_") == 2
    if shutil.which("dot"):  # Graphviz, when installed, must accept it
        subprocess.run(["dot", "-Tsvg", str(out_dot)], check=True, capture_output=True)


def test_plan_takes_a_file_path_a_loss_and_device_names_and_draws_a_png(factory_file, tmp_path):
    png = tmp_path / "plan.png"
    rc = main(["plan", f"{factory_file}:build_with_loss", "--devices", "cpu,sim:1", "--steps", "3",
               "--device-rate", "1e9", "--png", str(png)])
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("spec,message", [
    ("my_models:missing", "no callable 'missing'"),
    ("my_models:broken", "returned str"),
    ("no_such_module_xyz:build", "cannot import module"),
    ("my_models", "expected MODULE:FACTORY"),
])
def test_plan_reports_a_bad_factory_clearly(factory_file, capsys, spec, message):
    assert main(["plan", spec]) == 1
    assert message in capsys.readouterr().err


def test_the_installed_command_runs(factory_file, tmp_path):
    exe = shutil.which("lwcompile")
    cmd = [exe] if exe else [sys.executable, "-m", "lwcompile.cli"]
    res = subprocess.run([*cmd, "plan", f"{factory_file}:build", "--devices", "2", "--device-rate", "1e9",
                          "--json", str(tmp_path / "p.json")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "replicated plan" in res.stdout
    assert Plan.from_json((tmp_path / "p.json").read_text()).mode == "replicated"


def test_module_examples_run():
    import doctest

    import lwcompile.cli

    result = doctest.testmod(lwcompile.cli)
    assert result.attempted > 0 and result.failed == 0


def test_version_comes_from_the_package_metadata_and_python_dash_m_runs_the_cli(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"lwcompile {version('lwcompile')}"
    res = subprocess.run([sys.executable, "-m", "lwcompile", "--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == f"lwcompile {version('lwcompile')}", res.stderr


def test_train_help_explains_the_factory_and_every_option_with_its_default(capsys):
    from lwcompile.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    train = sub.choices["train"]
    for action in train._actions:
        if action.help == argparse.SUPPRESS or action.dest == "help":
            continue
        assert action.help and len(action.help) > 15, action.dest
        if action.default not in (None, False, [], argparse.SUPPRESS):
            assert "default" in action.help, f"--{action.dest} has default {action.default!r} but says nothing"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needed in ("importable module", "path to a .py file", "lwcompile.TrainJob", "--resume", "curve.csv",
                   "checkpoint.pt", "Ctrl-C", "status 130"):
        assert needed in text, needed
    assert "--stop-after" not in text  # a testing hook, not an option for users


@pytest.mark.parametrize("devices,mode", [(1, "replicated"), (4, "partitioned")])  # one tall, one wide
def test_a_50_block_plan_draws_every_label_inside_the_picture_without_overlaps(tmp_path, devices, mode):
    from matplotlib.text import Text

    from lwcompile.ir import Block
    from lwcompile.runtime.placement import make_plan

    names = [f"encoder.layers.{i}.feed_forward.linear{i % 2 + 1}" for i in range(50)]
    blocks = [Block(n, n, "linear", (), "relu", (), n + ".weight", None, (16 + i, 16 + i), None, (8, 16 + i),
                    (8, 16 + i), 2 * (16 + i) ** 2) for i, n in enumerate(names)]
    edges = [(a, b, 8 * 40 * 4) for a, b in zip(names, names[1:])]
    plan = make_plan(blocks, edges, 10, devices, mode, device_rate=1e9)
    fig = plan.figure()
    fig.canvas.draw()  # places the label boxes
    renderer = fig.canvas.get_renderer()
    whole, tight = fig.bbox, fig.get_tightbbox(renderer)
    assert 0 <= tight.x0 and 0 <= tight.y0 and tight.x1 <= fig.bbox_inches.x1 and tight.y1 <= fig.bbox_inches.y1
    drawn = [t for ax in fig.axes for t in (*ax.texts, ax.title, ax.xaxis.label, ax.yaxis.label)] + fig.texts
    drawn += [t for ax in fig.axes if ax.axison for t in ax.get_xticklabels() + ax.get_yticklabels()]
    texts = [t for t in drawn if isinstance(t, Text) and t.get_visible() and t.get_text()]
    assert sum(t.get_text().split("\n")[0] in names for t in texts) == 50
    assert any(f"{len(names)} blocks on {devices} devices" in t.get_text().replace("\n", " ") for t in texts)
    for t in texts:
        box = t.get_window_extent(renderer)
        assert whole.x0 - 0.5 <= box.x0 and box.x1 <= whole.x1 + 0.5, t.get_text()
        assert whole.y0 - 0.5 <= box.y0 and box.y1 <= whole.y1 + 0.5, t.get_text()
        assert t.get_fontsize() >= 7
    labels = [t.get_bbox_patch().get_window_extent(renderer) for t in texts if t.get_text().split("\n")[0] in names]
    assert not any(a.overlaps(b) for i, a in enumerate(labels) for b in labels[i + 1:])
    png = plan.draw(str(tmp_path / "plan.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_help_of_config_documents_every_field_with_its_default():
    import ast
    import dataclasses
    import re

    import lwcompile

    doc = " ".join(lwcompile.Config.__doc__.split())
    for f in dataclasses.fields(lwcompile.Config):
        entry = re.search(rf"``{f.name}`` \((.*?)default (.*?)(?:;|\):)", doc)
        assert entry, f"Config.{f.name} is not documented with its default"
        assert ast.literal_eval(entry.group(2)) == f.default, (f.name, entry.group(2))
