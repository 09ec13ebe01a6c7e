"""Saving and loading an :class:`lwcompile.runtime.ort.OrtProgram`'s training state (``run.state_dict()``).

The state is a plain dict of torch tensors, strings, ints and floats (``torch.save`` it; ``torch.load(path,
weights_only=True)`` reads it back)::

    {"format": "lwcompile-ort-state/1", "fingerprint": "<16 hex digits>", "step_count": 3, "inner_lr": 0.001,
     "params": {FQN: tensor}, "buffers": {FQN: tensor}, "inner_state": {block: [tensor, ...]},
     "outer_state": {FQN: {slot: tensor}}}          # slots carry torch.optim's names ("exp_avg", "step", ...)

``fingerprint`` hashes what fixes the state's layout in the exported directory's manifest (graph files with their
input and output names, shapes and dtypes; parameter, buffer, block and state names; the config and optimizers;
learning rates and the export's step count left out), so a state is refused by a run of a directory exported from
another model or config, and accepted by a re-export of the same program. :func:`load_state_dict` checks every
name, shape and dtype before it changes anything.

Example:
    >>> manifest_fingerprint({"format": "lwcompile-onnx/3", "files": [], "data": [], "program": {}})
    '846bc58d3e334836'
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import numpy as np

from lwcompile.errors import LwcompileError

FORMAT = "lwcompile-ort-state/1"
_LOOSE = {"inner_lr", "outer_lr"}  # learning rates may change between runs (schedules)


def manifest_fingerprint(manifest: Mapping[str, Any]) -> str:
    """A short hash of the parts of an export's manifest that the training state's layout depends on."""
    prog = manifest.get("program", {})
    config = {k: v for k, v in prog.get("config", {}).items() if k not in _LOOSE}
    inner = {k: v for k, v in prog.get("inner", {}).items() if k not in ("lr", "lr_factors")}
    outer = {k: v for k, v in prog.get("outer", {}).items() if k != "lr"}
    blocks = [{k: v for k, v in b.items() if k not in ("device", "batch")} for b in prog.get("blocks", [])]
    files = [{k: f.get(k) for k in ("file", "kind", "block", "inputs", "outputs")} for f in manifest.get("files", [])]
    training = [{k: t.get(k) for k in ("block", "optimizer", "optimizer_options", "params", "inputs")}
                for t in manifest.get("training", [])]
    keep = {"format": manifest.get("format"), "files": files, "training": training, "data": manifest.get("data"),
            "config": config, "inner": inner, "outer": outer, "blocks": blocks,
            "names": [prog.get(k) for k in ("params", "buffers", "nonblock")]}
    text = json.dumps(keep, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def state_dict(run) -> dict[str, Any]:
    """``run``'s state (an OrtProgram) as torch tensors and plain values; see the module docstring."""
    import torch

    stateful = sorted(n for n, blk in getattr(run, "_training", {}).items() if blk.info.get("optimizer") != "sgd")
    if stateful:
        raise LwcompileError(f"OrtProgram.state_dict: block(s) {stateful} run onnxruntime-training artifacts whose "
                             "optimizer keeps its state inside onnxruntime, where it cannot be read; use "
                             "inner='graphs' (the inner-update graphs carry the inner state) or SGD artifacts.")

    def t(a: Any) -> torch.Tensor:
        return torch.from_numpy(np.array(a, copy=True))

    outer = {} if run.outer is None else run.outer.state
    return {"format": FORMAT, "fingerprint": run.fingerprint, "step_count": int(run.step_count),
            "inner_lr": float(run.inner_lr),
            "params": {k: t(v) for k, v in run.params.items()},
            "buffers": {k: t(v) for k, v in run.buffers.items()},
            "inner_state": {b: [t(s) for s in st] for b, st in run.inner_state.items()},
            "outer_state": {p: {slot: t(v) for slot, v in slots.items()} for p, slots in outer.items()}}


def _array(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().cpu().numpy()
    return np.array(v, copy=True)


def _same(what: str, got: np.ndarray, want: np.ndarray) -> None:
    if got.shape != want.shape or got.dtype != want.dtype:
        raise LwcompileError(f"OrtProgram.load_state_dict: {what} is {got.dtype}{list(got.shape)}, the run holds "
                             f"{want.dtype}{list(want.shape)}; nothing was loaded.")


def _names(what: str, got: Mapping[str, Any], want: Mapping[str, Any]) -> None:
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise LwcompileError(f"OrtProgram.load_state_dict: {what} differ (missing {missing[:5]}, unexpected "
                             f"{extra[:5]}); nothing was loaded.")


def load_state_dict(run, state: Mapping[str, Any]) -> None:
    """Check ``state`` against ``run`` completely, then load it (all or nothing)."""
    if not isinstance(state, Mapping) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, Mapping) else type(state).__name__
        raise LwcompileError(f"OrtProgram.load_state_dict: not an OrtProgram state (format {got!r}, expected "
                             f"{FORMAT!r}); make it with OrtProgram.state_dict().")
    if state.get("fingerprint") != run.fingerprint:
        raise LwcompileError(f"OrtProgram.load_state_dict: the state was saved from an export with manifest "
                             f"fingerprint {state.get('fingerprint')!r}, this directory's is {run.fingerprint!r} "
                             "(another model, config or optimizer); nothing was loaded.")
    params = {k: _array(v) for k, v in state["params"].items()}
    buffers = {k: _array(v) for k, v in state["buffers"].items()}
    inner = {b: tuple(_array(s) for s in st) for b, st in state["inner_state"].items()}
    outer = {p: {s: _array(v) for s, v in slots.items()} for p, slots in state["outer_state"].items()}
    _names("parameters", params, run.params)
    _names("buffers", buffers, run.buffers)
    _names("blocks' inner states", inner, run.inner_state)
    for k, v in params.items():
        _same(f"parameter {k!r}", v, run.params[k])
    for k, v in buffers.items():
        _same(f"buffer {k!r}", v, run.buffers[k])
    for b, st in inner.items():
        if len(st) != len(run.inner_state[b]):
            raise LwcompileError(f"OrtProgram.load_state_dict: block {b!r} has {len(st)} inner-state tensors, the "
                                 f"run {len(run.inner_state[b])}; nothing was loaded.")
        for i, (v, w) in enumerate(zip(st, run.inner_state[b])):
            _same(f"block {b!r} inner state {i}", v, w)
    nonblock = set(run.program["outer"]["params"])
    if outer and (run.outer is None or not set(outer) <= nonblock):
        extra = sorted(set(outer) - nonblock)[:5]
        raise LwcompileError(f"OrtProgram.load_state_dict: outer-optimizer state for {extra}, which this run's outer "
                             "optimizer does not step; nothing was loaded.")
    run.params, run.buffers, run.inner_state = params, buffers, inner
    if run.outer is not None:
        run.outer.load_state(outer)
    run.step_count, run.inner_lr = int(state["step_count"]), float(state["inner_lr"])
