"""Specification of the command line: ``lwcompile plan MODULE:FACTORY`` prints the plan and writes JSON / DOT / PNG."""
from __future__ import annotations

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
