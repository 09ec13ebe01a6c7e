"""``prog.export_onnx(dir)`` and ``lwcompile export`` never delete, rename or change a file lwcompile did not write.

Every check compares the file system before and after (paths, kinds and bytes of every entry, hidden ones included)
against a snapshot taken here with os.walk, independent of lwcompile.passes.onnx_files.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lwcompile
from lwcompile.cli import main
from lwcompile.errors import ExportError
from lwcompile.passes import onnx_export, onnx_files
from lwcompile.passes.onnx_files import check_out_dir


def snapshot(root) -> dict[str, str]:
    """Every entry under ``root``: relative path -> "dir", "link -> target" or the sha256 of the file's bytes."""
    root = str(root)
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "link -> " + os.readlink(p)
            elif os.path.isdir(p):
                out[rel] = "dir"
            else:
                with open(p, "rb") as fh:
                    out[rel] = hashlib.sha256(fh.read()).hexdigest()
    return out


def files_on_disk(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
            for d, _, files in os.walk(root) for f in files}


@pytest.fixture(scope="module")
def prog():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    p = lwcompile.transform(m, F.mse_loss, torch.randn(6, 4), steps=2)
    p.build_target_graph(torch.randn(6, 2))
    return p


def export(prog, out, **kw):
    return prog.export_onnx(str(out), training=kw.pop("training", False), **kw)


# ----------------------------------------------------------------------------------------------- refusals
def test_a_directory_holding_a_user_file_is_refused_and_left_byte_identical(prog, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_bytes(b"my notes\n")
    (out / ".hidden").write_bytes(b"x")
    before, parent = snapshot(tmp_path), sorted(os.listdir(tmp_path))
    for overwrite in (False, True):
        with pytest.raises(ExportError, match=r"(?s)not empty and is not a previous lwcompile export.*notes\.txt"):
            export(prog, out, overwrite=overwrite)
        assert snapshot(tmp_path) == before
        assert sorted(os.listdir(tmp_path)) == parent  # no out.tmp-*, no out.old-*
    assert (out / "notes.txt").read_bytes() == b"my notes\n"


def test_exporting_to_dot_in_a_working_directory_with_user_files_touches_nothing(prog, tmp_path, monkeypatch):
    work = tmp_path / "project"
    (work / "data").mkdir(parents=True)
    (work / "train.py").write_text("print('hi')\n")
    (work / "data" / "x.csv").write_text("1,2\n")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    with pytest.raises(ExportError, match="train.py"):
        export(prog, ".")
    with pytest.raises(ExportError):
        export(prog, ".", overwrite=True)
    assert snapshot(tmp_path) == before
    assert os.getcwd() == str(work)


def test_a_regular_file_is_refused_not_renamed(prog, tmp_path):
    target = tmp_path / "model_out"
    target.write_bytes(b"\x00precious")
    before = snapshot(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(ExportError, match="is a file"):
            export(prog, target, overwrite=overwrite)
    assert snapshot(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["model_out"]  # in particular no model_out.old-XXXX


def test_a_link_to_a_file_is_refused_and_neither_it_nor_the_file_changes(prog, tmp_path):
    (tmp_path / "real").write_bytes(b"data")
    os.symlink(tmp_path / "real", tmp_path / "link")
    before = snapshot(tmp_path)
    with pytest.raises(ExportError, match="not a directory"):
        export(prog, tmp_path / "link", overwrite=True)
    assert snapshot(tmp_path) == before


def test_a_previous_export_is_not_replaced_unless_asked(prog, tmp_path):
    out = tmp_path / "out"
    export(prog, out)
    before = snapshot(tmp_path)
    with pytest.raises(ExportError, match="overwrite=True"):
        export(prog, out)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------ accepted
def test_an_empty_existing_directory_is_exported_into_and_stays_the_same_directory(prog, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    inode = os.stat(out).st_ino
    man = export(prog, out)
    assert os.stat(out).st_ino == inode  # filled in place, not replaced by a renamed temp dir
    assert files_on_disk(out) == set(man["written"])
    assert json.loads((out / "manifest.json").read_text())["format"].startswith("lwcompile-onnx")
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_missing_directory_and_its_parents_are_created(prog, tmp_path):
    out = tmp_path / "a" / "b" / "out"
    man = export(prog, out)
    assert files_on_disk(out) == set(man["written"])


def test_overwrite_replaces_a_previous_export_with_the_new_files_only(prog, tmp_path):
    out = tmp_path / "out"
    old = export(prog, out, training=True)  # has training/<block>/ folders
    assert any(f.startswith("training/") for f in old["written"])
    old_params = dict(np.load(out / "params.npz"))
    with torch.no_grad():  # new parameter values, so the new params.npz must differ from the old one
        for p in prog.model.parameters():
            p.add_(1.0)
    try:
        man = export(prog, out, overwrite=True)
        assert files_on_disk(out) == set(man["written"])  # old training/ gone, nothing stale, nothing hidden left
        assert not (out / "training").exists()
        new_params = dict(np.load(out / "params.npz"))
        for name, p in prog.trace_result.graph_module.named_parameters():
            np.testing.assert_array_equal(new_params[name], p.detach().numpy())
            np.testing.assert_array_equal(new_params[name], old_params[name] + np.float32(1.0))
        assert sorted(os.listdir(tmp_path)) == ["out"]
        from lwcompile.runtime.ort import OrtProgram

        assert OrtProgram(str(out)).blocks == [b.name for b in prog.blocks]  # a reader accepts the result
    finally:
        with torch.no_grad():
            for p in prog.model.parameters():
                p.sub_(1.0)


@pytest.mark.parametrize("where", ["top", "nested", "hidden"])
def test_overwrite_refuses_a_previous_export_plus_a_user_file_and_keeps_it(prog, tmp_path, where):
    out = tmp_path / "out"
    man = export(prog, out, training=where == "nested")
    if where == "nested":  # inside a folder the export made: training/<block>/mine.txt
        extra = next(f for f in man["written"] if f.startswith("training/")).rsplit("/", 1)[0] + "/mine.txt"
    else:
        extra = {"top": "my_notes.txt", "hidden": ".keep"}[where]
    (out / extra).write_bytes(b"user data")
    before = snapshot(tmp_path)
    with pytest.raises(ExportError, match="did not write: '" + extra.replace(".", r"\.")):
        export(prog, out, overwrite=True)
    assert snapshot(tmp_path) == before
    assert (out / extra).read_bytes() == b"user data"


def test_a_user_file_that_replaced_an_exported_folder_or_a_link_counts_as_foreign(tmp_path):
    out = tmp_path / "out"
    (out / "training" / "fc").mkdir(parents=True)
    written = ["manifest.json", "target.onnx", "training/fc/model.onnx"]
    (out / "manifest.json").write_text(json.dumps({"format": "lwcompile-onnx/2", "written": written}))
    (out / "training" / "fc" / "model.onnx").write_bytes(b"m")
    os.symlink(tmp_path, out / "target.onnx")  # a listed name, but a link: never something lwcompile wrote
    (out / "training" / "other").mkdir()
    with pytest.raises(ExportError) as err:
        check_out_dir(str(out), overwrite=True)
    assert "'target.onnx'" in str(err.value) and "'training/other/'" in str(err.value)


def test_a_manifest_without_the_written_list_is_still_recognised_from_its_sections(prog, tmp_path):
    out = tmp_path / "out"
    export(prog, out)
    man = json.loads((out / "manifest.json").read_text())
    del man["written"]  # as an export from before the list was recorded
    (out / "manifest.json").write_text(json.dumps(man))
    assert sorted(check_out_dir(str(out), overwrite=True)) == sorted(os.listdir(out))
    (out / "extra.bin").write_bytes(b"1")
    with pytest.raises(ExportError, match="extra.bin"):
        check_out_dir(str(out), overwrite=True)


def test_a_manifest_without_the_marker_does_not_make_a_directory_replaceable(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "someone-else/1", "written": ["manifest.json"]}))
    with pytest.raises(ExportError, match="not a previous lwcompile export"):
        check_out_dir(str(out), overwrite=True)


# ------------------------------------------------------------------------------------------------ failures
def _fail_on_graph(monkeypatch, n: int) -> None:
    """Make the n-th graph written by this export fail (after the earlier ones are on disk, in staging)."""
    real, calls = onnx_export.export_graph_module, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_graph_module", flaky)


@pytest.mark.parametrize("state", ["previous export", "empty", "missing"])
def test_a_failing_export_leaves_the_directory_as_it_was(prog, tmp_path, monkeypatch, state):
    out = tmp_path / "out"
    if state == "previous export":
        export(prog, out)
    elif state == "empty":
        out.mkdir()
    before = snapshot(tmp_path)
    _fail_on_graph(monkeypatch, 2)
    with pytest.raises(ExportError, match="injected failure"):
        export(prog, out, overwrite=True)
    assert snapshot(tmp_path) == before  # no staging or .old folder left, old export byte-identical


@pytest.mark.parametrize("fail_at", [1, 2, 5, 10, 14])
def test_a_failure_while_swapping_in_the_new_export_restores_the_previous_one(prog, tmp_path, monkeypatch, fail_at):
    out = tmp_path / "out"
    old = export(prog, out)
    before = snapshot(tmp_path)
    real, calls = onnx_files._move, []
    n_moves = 2 * len(os.listdir(out))  # the old entries out, the new ones (same names) in
    assert fail_at <= n_moves

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == fail_at:
            raise OSError("injected failure while moving")
        real(src, dst)

    monkeypatch.setattr(onnx_files, "_move", flaky)
    with torch.no_grad():
        prog.model[0].weight.add_(1.0)  # the new export differs from the old one
    try:
        with pytest.raises(ExportError, match="injected failure while moving"):
            export(prog, out, overwrite=True)
    finally:
        with torch.no_grad():
            prog.model[0].weight.sub_(1.0)
    assert snapshot(tmp_path) == before
    assert files_on_disk(out) == set(old["written"])


# ----------------------------------------------------------------------------------------------- the CLI
def _cli(out, *extra: str) -> int:
    return main(["export", "lwcompile.cli_export:demo_factory", str(out), "--steps", "2", "--no-training", *extra])


def test_cli_refuses_a_directory_with_user_files_and_a_file_and_replaces_only_with_overwrite(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("keep")
    (tmp_path / "afile").write_text("file")
    before = snapshot(tmp_path)
    assert _cli(mine) == 1 and "keep.txt" in capsys.readouterr().err
    assert _cli(mine, "--overwrite") == 1
    assert _cli(tmp_path / "afile", "--overwrite") == 1 and "is a file" in capsys.readouterr().err
    assert snapshot(tmp_path) == before

    out = tmp_path / "out"
    assert _cli(out) == 0
    first = snapshot(out)
    assert _cli(out) == 1 and "--overwrite" in capsys.readouterr().err
    assert snapshot(out) == first
    assert _cli(out, "--overwrite") == 0
    assert files_on_disk(out) == set(json.loads((out / "manifest.json").read_text())["written"])
    assert sorted(os.listdir(tmp_path)) == ["afile", "mine", "out"]


def test_cli_help_offers_overwrite(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "--overwrite" in capsys.readouterr().out
