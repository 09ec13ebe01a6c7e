"""Write an export directory (graphs, training artifacts, ``.npz`` arrays, ``manifest.json``) without ever touching a
file lwcompile did not write.

Rules, checked before anything is written (:func:`check_out_dir`) and again just before the result is moved in:

* a path that is a file (or a link, or anything but a directory) is refused;
* a missing or empty directory is fine;
* a non-empty directory is accepted only if it holds a previous lwcompile export (a ``manifest.json`` whose
  ``"format"`` starts with ``"lwcompile-onnx"``), only with ``overwrite=True``, and only if every entry in it is one
  that export wrote (its manifest's ``"written"`` list); otherwise :class:`ExportError` names the extra entries.

Everything is written into a hidden staging directory inside ``out_dir`` (same file system, so moves are renames) and
moved in at the end, ``manifest.json`` last: a reader sees the old export, no manifest (for the few renames of the
swap), or the new export, never a mix that claims to be complete. ``out_dir`` itself is never renamed or replaced (it
may be the working directory, or one the user made). On any failure the staging directory is removed, a half-done
swap is undone, and directories this call created are removed again.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import onnx
import torch

from lwcompile.errors import ExportError
from lwcompile.passes.onnx_training import export_training_artifacts
from lwcompile.ir import MUTATED_PREFIX
from lwcompile.safe_paths import inside

__all__ = ["FORMAT", "MARKER", "MANIFEST", "GraphExport", "TrainingExport", "describe_model", "export_onnx_dir",
           "check_out_dir", "staged_dir"]

MARKER = "lwcompile-onnx"  # manifest["format"] of every lwcompile export starts with it
FORMAT = MARKER + "/3"  # /3: the manifest's inner section lists lr_factors
MANIFEST = "manifest.json"
STAGE_PREFIX = ".lwcompile-stage-"
BACKUP_PREFIX = ".lwcompile-old-"


# ---------------------------------------------------------------------------------------------------------------
# What may be written where
# ---------------------------------------------------------------------------------------------------------------
def check_out_dir(out_dir: str, overwrite: bool, ignore: Sequence[str] = ()) -> list[str]:
    """Refuse (ExportError, nothing touched) unless exporting to ``out_dir`` can only replace lwcompile's own files.

    Returns the top-level entries of the previous export that the new one replaces ([] for a missing or empty
    directory). ``ignore`` names top-level entries to leave out of the check (this export's own staging directory).
    """
    try:
        return _check_out_dir(out_dir, overwrite, ignore)
    except OSError as e:  # e.g. a folder we may not list: refuse rather than guess what is in it
        raise ExportError(f"cannot export to {out_dir}: cannot inspect it ({e}).") from e


def _check_out_dir(out_dir: str, overwrite: bool, ignore: Sequence[str]) -> list[str]:
    path = os.path.abspath(out_dir)
    if os.path.lexists(path) and not os.path.isdir(path):
        kind = "a link that does not lead to a directory" if os.path.islink(path) else "a file"
        raise ExportError(f"cannot export to {out_dir}: it is {kind}, not a directory. lwcompile writes a directory "
                          "and never replaces or renames a file it did not write; choose another path.")
    if not os.path.exists(path):
        return []
    entries = sorted(e for e in os.listdir(path) if e not in ignore)
    if not entries:
        return []
    manifest = read_manifest(path)
    if manifest is None:
        raise ExportError(f"cannot export to {out_dir}: the directory is not empty and is not a previous lwcompile "
                          f"export (no {MANIFEST} with \"format\": \"{MARKER}/...\"); it holds {_few(entries)}. "
                          "lwcompile never deletes files it did not write: choose a new or empty directory.")
    # by name only: a link on disk is foreign_entries' to report
    outside = sorted(f for f in written_files(manifest) if inside(path, f, follow_links=False) is None)
    if outside:  # such a manifest was not written by lwcompile: nothing it names is trusted, nothing replaced
        raise ExportError(f"cannot export to {out_dir}: its {MANIFEST} lists paths outside the directory "
                          f"({_few(outside)}), which no lwcompile export writes; it was left alone. Move the "
                          "directory away or choose another one.")
    extra = foreign_entries(path, manifest, ignore)
    if extra:
        hint = "" if overwrite else " (even with overwrite=True it would not be replaced)"
        raise ExportError(f"cannot export to {out_dir}: it holds a previous lwcompile export plus entries that export "
                          f"did not write: {_few(extra, 10)}{hint}. lwcompile never deletes files it did not write: "
                          "move them away or choose another directory.")
    if not overwrite:
        raise ExportError(f"cannot export to {out_dir}: it holds a previous lwcompile export; pass overwrite=True "
                          "(CLI: --overwrite) to replace it, or choose another directory.")
    return entries


def read_manifest(path: str) -> dict | None:
    """The manifest of the lwcompile export in directory ``path``, or None if it holds none (or an unreadable one)."""
    f = os.path.join(path, MANIFEST)
    if os.path.islink(f) or not os.path.isfile(f):
        return None
    try:
        with open(f) as fh:
            man = json.load(fh)
    except (OSError, ValueError):
        return None
    ok = isinstance(man, dict) and isinstance(man.get("format"), str) and man["format"].startswith(MARKER)
    return man if ok else None


def written_files(manifest: Mapping[str, Any]) -> set[str]:
    """Relative paths (``/``-separated) of every file the export described by ``manifest`` wrote."""
    if isinstance(manifest.get("written"), list):
        files = {str(f) for f in manifest["written"]}
    else:  # an export from before "written" was recorded: rebuild the list from its sections
        files = {f["file"] for f in manifest.get("files", []) if isinstance(f, dict) and "file" in f}
        files |= {f for t in manifest.get("training", []) if isinstance(t, dict) for f in t.get("files", [])}
        files |= {d["file"] for d in manifest.get("data", []) if isinstance(d, dict) and "file" in d}
    return files | {MANIFEST}


def foreign_entries(path: str, manifest: Mapping[str, Any], ignore: Sequence[str] = ()) -> list[str]:
    """Entries under ``path`` that the export described by ``manifest`` did not write (a folder it did not make is
    reported once, as ``name/``). Links, and anything but plain files and folders, are never ours."""
    files = written_files(manifest)
    dirs = {"/".join(f.split("/")[:i]) for f in files for i in range(1, f.count("/") + 1)}
    extra: list[str] = []

    def walk(rel: str) -> None:
        with os.scandir(os.path.join(path, rel)) as it:
            for e in sorted(it, key=lambda e: e.name):
                name = f"{rel}/{e.name}" if rel else e.name
                if not rel and e.name in ignore:
                    continue
                if e.is_symlink():
                    extra.append(name)
                elif e.is_dir(follow_symlinks=False):
                    if name in dirs:
                        walk(name)
                    else:
                        extra.append(name + "/")
                elif not (e.is_file(follow_symlinks=False) and name in files):
                    extra.append(name)

    walk("")
    return extra


def _few(names: Sequence[str], k: int = 5) -> str:
    more = f" and {len(names) - k} more" if len(names) > k else ""
    return ", ".join(repr(n) for n in names[:k]) + more


# ---------------------------------------------------------------------------------------------------------------
# Staging and committing
# ---------------------------------------------------------------------------------------------------------------
def _move(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``, refusing to replace anything at ``dst`` (a rename would silently do so)."""
    if os.path.lexists(dst):
        raise ExportError(f"{dst} appeared while exporting; it was left alone and the export was not written.")
    os.rename(src, dst)


def _make_dirs(path: str) -> list[str]:
    """Create ``path`` and missing parents; returns the folders created, deepest first (to remove on failure)."""
    missing = []
    p = path
    while not os.path.exists(p):
        missing.append(p)
        p = os.path.dirname(p)
    made: list[str] = []
    try:
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:  # made meanwhile by someone else: not ours, so never removed
                continue
            made.insert(0, d)
    except BaseException:
        _remove_made(made)
        raise
    return made


@contextlib.contextmanager
def staged_dir(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield an empty staging folder; when the block ends without error, move its contents into ``out_dir``
    (replacing a previous export's files, see the module docstring). On error nothing is left behind."""
    path = os.path.abspath(out_dir)
    check_out_dir(path, overwrite)
    try:
        made = _make_dirs(path)
    except OSError as e:
        raise ExportError(f"cannot create {out_dir}: {e}") from e
    try:
        stage = tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=path)
    except OSError as e:
        _remove_made(made)
        raise ExportError(f"cannot write into {out_dir}: {e}") from e
    try:
        yield stage
        _commit(path, out_dir, stage, overwrite)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)  # all ours: made by mkdtemp above
        _remove_made(made)
        raise
    shutil.rmtree(stage, ignore_errors=True)


def _remove_made(made: Sequence[str]) -> None:
    for d in made:  # deepest first; rmdir only removes an empty folder, so nobody else's file can go
        with contextlib.suppress(OSError):
            os.rmdir(d)


def _commit(path: str, out_dir: str, stage: str, overwrite: bool) -> None:
    """Move the staged export into ``path``: old manifest out first, new manifest in last; undo on failure."""
    old = check_out_dir(path, overwrite, ignore=[os.path.basename(stage)])  # again: files may have appeared
    new = sorted(os.listdir(stage), key=lambda n: (n == MANIFEST, n))
    backup = tempfile.mkdtemp(prefix=BACKUP_PREFIX, dir=path) if old else None
    moved_out: list[str] = []
    moved_in: list[str] = []
    try:
        for name in sorted(old, key=lambda n: (n != MANIFEST, n)):
            _move(os.path.join(path, name), os.path.join(backup, name))
            moved_out.append(name)
        for name in new:
            _move(os.path.join(stage, name), os.path.join(path, name))
            moved_in.append(name)
    except BaseException as e:
        try:
            for name in reversed(moved_in):
                os.rename(os.path.join(path, name), os.path.join(stage, name))
            for name in reversed(moved_out):
                os.rename(os.path.join(backup, name), os.path.join(path, name))
            if backup:
                os.rmdir(backup)
        except OSError as undo:
            e.add_note(f"undoing the half-done replacement of {out_dir} failed ({undo}); the previous export's "
                       f"files are in {backup}")
        raise
    if backup:
        shutil.rmtree(backup, ignore_errors=True)  # only entries check_out_dir proved the previous export wrote


# ---------------------------------------------------------------------------------------------------------------
# Manifest and directory export
# ---------------------------------------------------------------------------------------------------------------
_ELEM = {v: k for k, v in onnx.TensorProto.DataType.items()}


def _value_info(v) -> dict:
    t = v.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    return {"name": v.name, "shape": shape, "dtype": _ELEM.get(t.elem_type, str(t.elem_type)).lower()}


def describe_model(model: onnx.ModelProto) -> dict:
    """Inputs and outputs (name, shape, dtype) and versions of a model, for the manifest."""
    return {
        "inputs": [_value_info(v) for v in model.graph.input],
        "outputs": [_value_info(v) for v in model.graph.output],
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "ir_version": model.ir_version,
    }


@dataclass
class GraphExport:
    """One graph to write with :func:`export_onnx_dir`. ``file`` defaults to ``<name>.onnx``."""

    name: str
    graph_module: torch.fx.GraphModule
    example_inputs: Sequence[torch.Tensor]
    input_names: Sequence[str] | None = None
    output_names: Sequence[str] | None = None
    block: str | None = None
    device: str | None = None
    kind: str = "graph"  # "target" | "inner" | anything descriptive
    file: str | None = None


@dataclass
class TrainingExport:
    """One block's onnxruntime-training artifacts for :func:`export_onnx_dir` (kwargs of export_training_artifacts)."""

    block: str
    kwargs: dict = field(default_factory=dict)
    device: str | None = None
    subdir: str | None = None  # default training/<block>
    adam_mode: int | None = None  # set on the AdamW optimizer graph (0: torch's Adam(W); onnxblock writes 1)


def safe_name(name: str) -> str:
    """``name`` with every character that is not safe in a file name replaced by ``_``."""
    return re.sub(r"[^\w.-]", "_", name)


def export_onnx_dir(out_dir: str, graphs: Sequence[GraphExport], training: Sequence[TrainingExport] = (),
                    opset: int = 18, meta: dict | None = None, overwrite: bool = False,
                    arrays: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                    program: dict | None = None) -> dict:
    """Write several graphs (training artifacts, ``.npz`` arrays) into ``out_dir`` with a ``manifest.json``.

    ``out_dir`` must be missing, empty, or (with ``overwrite=True``) a previous export holding nothing else; see the
    module docstring. ``arrays`` maps a file name ("params.npz") to named arrays. Returns the manifest (also in
    ``manifest.json``)::

        {"format": "lwcompile-onnx/2", "opset": 18, "mutated_output_prefix": "new__", "meta": {...},
         "files": [{"file": "target.onnx", "name": ..., "kind": ..., "block": ..., "device": ...,
                    "inputs": [{"name", "shape", "dtype"}], "outputs": [...], "mutates": {"new__X": "X"}}, ...],
         "training": [{"block": ..., "dir": "training/fc1", "files": [...], "inputs": [...], "params": [...], ...}],
         "data": [{"file": "params.npz", "arrays": {"fc1.weight": {"shape": [4, 3], "dtype": "float32"}}}],
         "program": {...},   # export_program only: see program_manifest
         "written": ["inner_0.onnx", ..., "training/fc1/lwblock.json", ...]}   # every file, to replace it later
    """

    manifest: dict[str, Any] = {"format": FORMAT, "opset": opset, "mutated_output_prefix": MUTATED_PREFIX,
                                "meta": meta or {}, "files": [], "training": [], "data": []}
    with staged_dir(out_dir, overwrite) as tmp:
        used: set[str] = set()
        for ge in graphs:
            manifest["files"].append(_write_graph(tmp, ge, opset, used))
        for te in training:
            sub = te.subdir or "training/" + safe_name(te.block)
            info = export_training_artifacts(**te.kwargs, out_dir=os.path.join(tmp, sub))
            if te.adam_mode is not None:
                info = _set_adam_mode(os.path.join(tmp, sub), info, te.adam_mode)
            info.update({"block": te.block, "device": te.device, "dir": sub,
                         "files": [f"{sub}/{f}" for f in info["files"]]})
            manifest["training"].append(info)
        for fname, named in (arrays or {}).items():
            np.savez(os.path.join(tmp, fname), **{k: np.asarray(v) for k, v in named.items()})
            manifest["data"].append({"file": fname, "arrays": {k: {"shape": list(np.shape(v)),
                                                                  "dtype": str(np.asarray(v).dtype)}
                                                              for k, v in named.items()}})
        if program is not None:
            manifest["program"] = program
        manifest["written"] = sorted(_files_under(tmp) + [MANIFEST])
        with open(os.path.join(tmp, MANIFEST), "w") as fh:
            json.dump(manifest, fh, indent=2, default=str)
    return manifest


def _set_adam_mode(art_dir: str, info: dict, mode: int) -> dict:
    """Set the AdamWOptimizer node's ``adam_mode`` in a staged artifact directory (onnxblock always writes 1, the
    Hugging Face variant; 0 is torch's: bias corrections on m and on √v, eps added after); records it as optimizer
    "adam" (mode 0 without weight decay is torch.optim.Adam) in ``lwblock.json``."""
    path = os.path.join(art_dir, "optimizer_model.onnx")
    model = onnx.load(path)
    nodes = [n for n in model.graph.node if n.op_type == "AdamWOptimizer"]
    attrs = [a for n in nodes for a in n.attribute if a.name == "adam_mode"]
    if len(nodes) != 1 or len(attrs) != 1:
        raise ExportError(f"{path}: expected one AdamWOptimizer node with an adam_mode attribute, found "
                          f"{len(nodes)} node(s); this onnxruntime-training version writes another optimizer graph.")
    attrs[0].i = mode
    onnx.save_model(model, path)
    info = dict(info, adam_mode=mode)
    if mode == 0 and not info.get("optimizer_options", {}).get("weight_decay"):
        info["optimizer"] = "adam"
    with open(os.path.join(art_dir, "lwblock.json"), "w") as fh:
        json.dump({k: v for k, v in info.items() if k not in ("block", "device", "dir")}, fh, indent=2, default=str)
    return info


def _files_under(root: str) -> list[str]:
    """Every file below ``root``, as ``/``-separated paths relative to it."""
    return [os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
            for d, _, files in os.walk(root) for f in files]


def _write_graph(tmp: str, ge: GraphExport, opset: int, used: set[str]) -> dict:
    from lwcompile.passes.onnx_export import export_graph_module  # here: onnx_export imports this module

    fname = ge.file or safe_name(ge.name) + ".onnx"
    if fname in used:
        raise ExportError(f"two graphs write {fname}")
    used.add(fname)
    model = export_graph_module(ge.graph_module, ge.example_inputs, os.path.join(tmp, fname),
                                ge.input_names, ge.output_names, opset, ge.name)
    desc = describe_model(model)
    mutates = {o["name"]: o["name"][len(MUTATED_PREFIX):] for o in desc["outputs"]
               if o["name"].startswith(MUTATED_PREFIX)}
    return {"file": fname, "name": ge.name, "kind": ge.kind, "block": ge.block, "device": ge.device, **desc,
            "mutates": mutates}
