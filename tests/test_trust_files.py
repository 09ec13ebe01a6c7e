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


# ------------------------------------------------------------------------- 9: manifest paths outside the export
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    prog = lwcompile.transform(m, F.mse_loss, torch.randn(6, 4), steps=2)
    out = tmp_path_factory.mktemp("export") / "out"
    prog.export_onnx(str(out), example_labels=torch.randn(6, 2), training=False)
    return prog, out


def _copy_with(exported, tmp_path, edit):
    import json
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(exported[1], out, symlinks=True)
    man = json.loads((out / "manifest.json").read_text())
    edit(man, out)
    (out / "manifest.json").write_text(json.dumps(man))
    return out


def _outside_params(man, out, how):
    import shutil

    elsewhere = out.parent / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    shutil.copy(out / man["program"]["params_file"], elsewhere / "params.npz")  # a loadable file: only its place is bad
    if how == "dotdot":
        man["program"]["params_file"] = "../elsewhere/params.npz"
    elif how == "absolute":
        man["program"]["params_file"] = str(elsewhere / "params.npz")
    else:  # a link inside the directory that leads out of it
        (out / "linked.npz").symlink_to(elsewhere / "params.npz")
        man["program"]["params_file"] = "linked.npz"


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_ort_program_refuses_manifest_paths_outside_its_directory(exported, tmp_path, how):
    from lwcompile.runtime.ort import OrtProgram

    OrtProgram(str(exported[1]))  # the export itself loads
    out = _copy_with(exported, tmp_path, lambda man, out: _outside_params(man, out, how))
    with pytest.raises(lwcompile.LwcompileError, match="leads outside"):
        OrtProgram(str(out))


def test_ort_program_refuses_a_graph_path_outside_its_directory(exported, tmp_path):
    import shutil

    from lwcompile.runtime.ort import OrtProgram

    def edit(man, out):
        target = man["program"]["target"]["file"]
        shutil.copy(out / target, out.parent / "graph.onnx")
        man["program"]["target"]["file"] = "../graph.onnx"
        for f in man["files"]:
            if f["file"] == target:
                f["file"] = "../graph.onnx"

    out = _copy_with(exported, tmp_path, edit)
    with pytest.raises(lwcompile.LwcompileError, match="'../graph.onnx' leads outside"):
        OrtProgram(str(out))


def test_export_overwrite_refuses_a_previous_manifest_naming_paths_outside(exported, tmp_path):
    prog, _ = exported
    victim = tmp_path / "victim.txt"
    victim.write_text("mine\n")

    def edit(man, out):
        man["written"] = [*man["written"], "../victim.txt"]

    out = _copy_with(exported, tmp_path, edit)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(lwcompile.ExportError, match="outside the directory"):
        prog.export_onnx(str(out), example_labels=torch.randn(6, 2), training=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before and victim.read_text() == "mine\n"


# ------------------------------------------------------------------- 10: exported files follow the umask
def test_exported_files_and_folders_have_the_modes_an_ordinary_write_gives(exported, tmp_path):
    prog, _ = exported
    old = os.umask(0o027)
    try:
        out = tmp_path / "out"
        prog.export_onnx(str(out), example_labels=torch.randn(6, 2), training=True)
    finally:
        os.umask(old)
    modes = {}
    for d, dirs, files in os.walk(out):
        for name in dirs + files:
            p = os.path.join(d, name)
            modes[os.path.relpath(p, out)] = (os.path.isdir(p), os.stat(p).st_mode & 0o777)
    assert any(name.endswith(".onnx") for name in modes) and any(is_dir for is_dir, _ in modes.values())
    wrong = {n: oct(m) for n, (is_dir, m) in modes.items() if m != (0o750 if is_dir else 0o640)}
    assert not wrong, wrong
    assert os.stat(out).st_mode & 0o777 == 0o750
