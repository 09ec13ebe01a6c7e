"""Files lwcompile is handed are trusted only as far as they are checked: an unusable ``--out`` is refused before
the first step, a damaged or foreign ``--resume`` checkpoint is refused naming the file, and a Program state whose
outer-optimizer slots do not fit is refused at load, changing nothing."""
from __future__ import annotations

import io
import os
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcompile
from lwcompile.cli import main

JOBS = textwrap.dedent("""
    import torch
    from torch import nn
    import lwcompile

    STEPS = []

    def _job(width):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(16, 4, generator=g)
        y = torch.randn(16, 2, generator=g)
        model = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 2))
        def loss(out, y):
            STEPS.append(1)  # counts the loss evaluations: a refused run must not have trained
            return nn.functional.mse_loss(out, y)
        return lwcompile.TrainJob(model, loss, (x, y), batch_size=8,
                                  config=lwcompile.Config(inner_optimizer="gd", inner_lr=1e-2, steps=1))

    def small():
        return _job(6)

    def wide():
        return _job(9)
""")


@pytest.fixture
def jobs(tmp_path, monkeypatch):
    (tmp_path / "trust_jobs.py").write_text(JOBS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys
    sys.modules.pop("trust_jobs", None)
    module = importlib.import_module("trust_jobs")
    yield module
    sys.modules.pop("trust_jobs", None)


def _train(*argv: str) -> int:
    return main(["train", *argv, "--no-progress", "--steps", "2"])


def _refused(capsys, rc: int, *words: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("lwcompile train: error: ") and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


# ------------------------------------------------------------------------------------------ 6: unusable --out
def test_an_out_path_that_is_a_file_is_refused_before_the_first_step(jobs, tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("mine\n")
    _refused(capsys, _train("trust_jobs:small", "--out", str(target)), str(target), "not a folder")
    assert target.read_text() == "mine\n" and jobs.STEPS == []  # refused before anything trained or was written
    _refused(capsys, _train("trust_jobs:small", "--out", str(target / "sub" / "run")), str(target), "not a folder")
    assert target.read_text() == "mine\n" and jobs.STEPS == []
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "curve.csv").mkdir()  # an output name taken by a folder
    _refused(capsys, _train("trust_jobs:small", "--out", str(tmp_path / "run"), "--overwrite"), "curve.csv")
    assert jobs.STEPS == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_an_out_folder_that_cannot_be_written_is_refused_before_the_first_step(jobs, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _refused(capsys, _train("trust_jobs:small", "--out", str(locked / "run")), "not writable")
        _refused(capsys, _train("trust_jobs:small", "--out", str(locked)), "not writable")
    finally:
        locked.chmod(0o700)
    assert jobs.STEPS == [] and list(locked.iterdir()) == []


def test_a_usable_out_still_trains(jobs, tmp_path, capsys):
    assert _train("trust_jobs:small", "--out", str(tmp_path / "new" / "run")) == 0
    assert sorted(p.name for p in (tmp_path / "new" / "run").iterdir()) == ["checkpoint.pt", "curve.csv", "curve.png"]


# ------------------------------------------------------------------------------------- 7: unusable --resume
def _damaged(kind: str, good: bytes, tmp_path, jobs) -> bytes:
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "random bytes":
        return os.urandom(4096)
    if kind == "plain dict":
        buf = io.BytesIO()
        torch.save({"weights": torch.zeros(3)}, buf)
        return buf.getvalue()
    if kind == "missing keys":  # the format tag but nothing else
        buf = io.BytesIO()
        torch.save({"format": "lwcompile-train/1", "options": {}}, buf)
        return buf.getvalue()
    raise AssertionError(kind)


@pytest.mark.parametrize("kind,words", [("truncated", "not a readable checkpoint"),
                                        ("random bytes", "not a readable checkpoint"),
                                        ("plain dict", "not a checkpoint of lwcompile train"),
                                        ("missing keys", "model, program, loop")])
def test_a_damaged_checkpoint_is_refused_naming_the_file(jobs, tmp_path, capsys, kind, words):
    assert _train("trust_jobs:small", "--out", str(tmp_path / "good")) == 0
    bad = tmp_path / "bad" / "checkpoint.pt"
    bad.parent.mkdir()
    bad.write_bytes(_damaged(kind, (tmp_path / "good" / "checkpoint.pt").read_bytes(), tmp_path, jobs))
    capsys.readouterr()
    jobs.STEPS.clear()
    _refused(capsys, _train("trust_jobs:small", "--resume", str(bad), "--steps", "4"), f"{bad}: ", words)
    assert sorted(p.name for p in bad.parent.iterdir()) == ["checkpoint.pt"] and jobs.STEPS == []


def test_a_checkpoint_of_another_model_is_refused_naming_the_file(jobs, tmp_path, capsys):
    assert _train("trust_jobs:wide", "--out", str(tmp_path / "wide")) == 0
    ckpt = tmp_path / "wide" / "checkpoint.pt"
    before = ckpt.read_bytes()
    capsys.readouterr()
    jobs.STEPS.clear()
    _refused(capsys, _train("trust_jobs:small", "--resume", str(ckpt), "--steps", "4"), f"{ckpt}: ",
             "another model", "0.weight")
    assert ckpt.read_bytes() == before and jobs.STEPS == []
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["checkpoint.pt", "curve.csv", "curve.png"]


# ----------------------------------------------------------------------- 8: outer-optimizer slots that do not fit
def _prog(outer: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2))  # LayerNorm: outer params
    cfg = lwcompile.Config(steps=1, inner_optimizer="gd", inner_lr=0.05, outer_optimizer=outer, outer_lr=0.01)
    return model, lwcompile.transform(model, F.mse_loss, torch.zeros(8, 3), cfg)


@pytest.mark.parametrize("outer,slot", [("adam", "exp_avg"), ("momentum", "momentum_buffer"),
                                        ("rmsprop", "square_avg")])
@pytest.mark.parametrize("change", ["shape", "dtype"])
def test_outer_slots_of_the_wrong_shape_or_dtype_are_refused_at_load(outer, slot, change):
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    model, prog = _prog(outer)
    prog.step(x, y)
    good = prog.state_dict()
    bad = {**good, "outer": {**good["outer"], "state": {i: dict(s) for i, s in good["outer"]["state"].items()}}}
    first = next(iter(bad["outer"]["state"]))
    t = bad["outer"]["state"][first][slot]
    bad["outer"]["state"][first][slot] = torch.zeros(t.numel() + 1) if change == "shape" else t.double()
    before = {k: [v.clone() if isinstance(v, torch.Tensor) else v for v in s.values()]
              for k, s in prog.outer_state().items()}
    with pytest.raises(lwcompile.LwcompileError) as e:
        prog.load_state_dict(bad)
    name = prog._outer.names[0]
    assert f"parameter {name!r}" in str(e.value) and f"slot {slot!r}" in str(e.value)
    after = {k: list(s.values()) for k, s in prog.outer_state().items()}
    assert before.keys() == after.keys() and all(
        all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(before[k], after[k]))
        for k in before)
    assert prog.step_count == 1
    prog.load_state_dict(good)  # the intact state still loads and steps
    assert torch.isfinite(torch.as_tensor(prog.step(x, y)))
