"""Run exported graphs with onnxruntime, without torch in the loop.

``OrtGraph(path)`` runs one standalone ONNX file made by :mod:`lwcompile.passes.onnx_export` (CPU).
``OrtTrainingBlock(artifacts_dir)`` runs a block's inner loop with onnxruntime-training (CheckpointState,
Module, Optimizer) from the artifacts of :func:`lwcompile.passes.onnx_training.export_training_artifacts`.
``OrtProgram(out_dir)`` runs whole training steps of a program exported with ``prog.export_onnx(out_dir)``.

Example:
    >>> g = OrtGraph("out/target.onnx")                     # doctest: +SKIP
    >>> loss, *rest = g(*inputs)                            # numpy arrays  # doctest: +SKIP
    >>> blk = OrtTrainingBlock("out/training/fc1")           # doctest: +SKIP
    >>> w = blk.train(x, target, steps=10, lr=1e-3)          # {"weight": ..., "bias": ...}  # doctest: +SKIP
    >>> run = OrtProgram("out"); loss = run.step(x, y); run.write_back(model)   # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from lwcompile.config import Config
from lwcompile.errors import FileError, LwcompileError, NonFiniteError
from lwcompile.safe_paths import inside
from lwcompile.schedule import schedule_factor
from lwcompile.runtime import ort_state
from lwcompile.runtime.ort_optim import NumpyOptimizer, make_numpy_optimizer
from lwcompile.ir import as_tuple
from lwcompile.runtime.ort_graphs import OrtGraph, OrtTrainingBlock, to_numpy  # noqa: F401  (re-exported)


# the program's inner optimizer -> the artifacts' optimizer that runs it exactly (lwcompile.export writes these)
EXACT_ARTIFACT_OPTIMIZER = {"gd": "sgd", "adam": "adam"}

class OrtProgram:
    """Training steps of an exported program, from the files alone, in onnxruntime sessions (torch is not called).

    One :meth:`step` does what ``Program.step`` does: the target graph gives the loss, each block's input and target
    and the non-block gradients, and the new BatchNorm-style buffers (its ``new__`` outputs); each block's
    inner-update graph gives its new weights and inner-optimizer state; the non-block parameters take one step of the
    outer optimizer (:mod:`lwcompile.runtime.ort_optim`, torch.optim's update in numpy). Parameters, buffers and
    optimizer states start from the values saved at export time, so ``OrtProgram(dir)`` continues where the program
    was. Nothing changes when the loss, a target or a new weight is not finite (``check_finite``).

    Every graph has a dynamic batch dimension: any batch size runs, a last partial batch too.
    :meth:`state_dict` / :meth:`load_state_dict` save and restore the whole training state (see
    :mod:`lwcompile.runtime.ort_state`).

    ``inner="training"`` runs the inner loop of each block that has onnxruntime-training artifacts with them instead
    (``OrtTrainingBlock``: T steps of the artifacts' optimizer at lr·max(1 − k/T, 0.25) or lr, the proximal anchor
    the weights at the start of the step); the other blocks use their inner graph. This equals ``Program.step`` for
    the inner optimizers onnxruntime-training has (``EXACT_ARTIFACT_OPTIMIZER``: "gd" with SGD artifacts, "adam"
    with torch-mode AdamW artifacts, what ``export_onnx`` writes for them by default), with or without
    ``inner_lr_decay``; "adam" only from the initial inner state (onnxruntime keeps its optimizer state itself and
    cannot be given an exported one, so a directory exported after steps is refused). With another inner optimizer
    the artifacts' optimizer runs instead (a different method: a warning says so).

    Example:
        >>> import torch, lwcompile
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> prog = lwcompile.transform(m, torch.nn.functional.mse_loss, torch.randn(16, 4), steps=2)
        >>> _ = prog.export_onnx("/tmp/lw_ort", example_labels=torch.randn(16, 2))   # doctest: +SKIP
        >>> run = OrtProgram("/tmp/lw_ort")                                          # doctest: +SKIP
        >>> loss = run.step(torch.randn(16, 4).numpy(), torch.randn(16, 2).numpy())  # doctest: +SKIP
        >>> run.write_back(m)                                                        # doctest: +SKIP
    """

    def __init__(self, out_dir: str | os.PathLike, inner: str = "graphs", threads: int | None = None) -> None:
        if inner not in ("graphs", "training"):
            raise LwcompileError(f"OrtProgram(inner={inner!r}): use 'graphs' (the inner-update graphs) or 'training' "
                                 "(the onnxruntime-training artifacts).")
        self.dir = str(out_dir)
        path = os.path.join(self.dir, "manifest.json")
        if not os.path.isfile(path):
            raise LwcompileError(f"{self.dir}: no manifest.json; write the directory with prog.export_onnx(dir).")
        path = self._path("manifest.json")
        with open(path) as fh:
            self.manifest = json.load(fh)
        prog = self.manifest.get("program")
        if prog is None or "lr_factors" not in prog.get("inner", {}):
            raise LwcompileError(f"{path} was written by an older lwcompile (format {self.manifest.get('format')!r}); "
                                 "export the directory again with prog.export_onnx(dir).")
        self.program, self.mode = prog, inner
        self.fingerprint = ort_state.manifest_fingerprint(self.manifest)  # what a saved state must match
        self.blocks = [b["name"] for b in prog["blocks"]]
        self.config = dict(prog["config"])
        self._schedule = Config(**{k: v for k, v in self.config.items() if k.startswith("inner_lr_")
                                   and k != "inner_lr_decay"})
        self.inner_lr = float(prog["inner"]["lr"])
        self.step_count = int(prog.get("step_count", 0))
        self.params = self._load(prog["params_file"], prog["params"])
        self.buffers = self._load(prog["buffers_file"], prog["buffers"])
        state = self._load(prog["inner"]["state_file"], [k for b in prog["blocks"] for k in b["state"]])
        self.inner_state = {b["name"]: tuple(state[k] for k in b["state"]) for b in prog["blocks"]}
        self.outer = self._make_outer()
        files = {f["file"]: f for f in self.manifest["files"]}
        self._target = OrtGraph(self._path(prog["target"]["file"]), threads=threads)
        self._mutates = files[prog["target"]["file"]].get("mutates", {})
        self._inner = {b["name"]: OrtGraph(self._path(b["file"]), threads=threads) for b in prog["blocks"]}
        self._training = {b["name"]: OrtTrainingBlock(self._path(b["training"]))
                          for b in prog["blocks"] if inner == "training" and b.get("training")}
        self._check_artifact_optimizers()

    def _check_artifact_optimizers(self) -> None:
        """Warn when the artifacts run another optimizer than the program's inner one (a different method); refuse
        stateful artifacts when the exported inner state is not the initial one (onnxruntime-training starts its
        optimizer state at zero and offers no way to load it)."""
        inner = self.program["inner"]["optimizer"]
        opts = {t.info["optimizer"] for t in self._training.values()}
        if self._training and opts != {EXACT_ARTIFACT_OPTIMIZER.get(inner)}:
            warnings.warn(f"OrtProgram(inner='training'): the artifacts' optimizer ({', '.join(sorted(opts))}) runs "
                          f"the inner loop, not the program's {inner!r}; the result differs from Program.step "
                          f"(the artifacts reproduce {EXACT_ARTIFACT_OPTIMIZER}).", stacklevel=3)
        started = [n for n, t in self._training.items() if t.info["optimizer"] != "sgd"
                   and any(np.any(s) for s in self.inner_state[n])]
        if started:
            raise LwcompileError(f"OrtProgram(inner='training'): block(s) {started} were exported with inner-optimizer "
                                 "state from earlier steps, which onnxruntime-training's optimizer cannot be given (it "
                                 "starts at zero); use inner='graphs', which continues exactly from it.")

    def _path(self, rel: Any) -> str:
        """``rel`` from the manifest, resolved inside the directory: never a file elsewhere (an absolute path,
        ``..`` or a link leading out is refused)."""
        path = inside(self.dir, rel)
        if path is None:
            raise FileError(f"{os.path.join(self.dir, 'manifest.json')}: the path {rel!r} leads outside {self.dir}; "
                            "an export only refers to files inside its directory, so this manifest was not written by "
                            "lwcompile (or was changed): export the directory again with prog.export_onnx(dir).")
        return path

    def _load(self, fname: str, names: Sequence[str]) -> dict[str, np.ndarray]:
        if not names:
            return {}
        with np.load(self._path(fname)) as z:
            missing = [n for n in names if n not in z.files]
            if missing:
                raise LwcompileError(f"{self.dir}/{fname} lacks {missing[:5]}; export the directory again.")
            return {n: np.array(z[n]) for n in names}

    def _make_outer(self) -> NumpyOptimizer | None:
        outer = self.program["outer"]
        if not outer["params"] or outer["optimizer"] == "none":
            return None
        opt = make_numpy_optimizer(outer["optimizer"], outer["lr"], outer.get("options"))
        if outer.get("state_file"):
            with np.load(self._path(outer["state_file"])) as z:
                slots: dict[str, dict[str, np.ndarray]] = {}
                for key in z.files:
                    name, slot = key.rsplit("/", 1)
                    slots.setdefault(name, {})[slot] = np.array(z[key])
            opt.load_state(slots)
        return opt

    # ------------------------------------------------------------------------------------------------ one step
    def compute_targets(self, x: Any, y: Any) -> dict[str, Any]:
        """Run the target graph: loss, per block its input and target, the non-block gradients and new buffers."""
        t = self.program["target"]
        xs, ys = as_tuple(x), as_tuple(y)
        if len(xs) != len(t["inputs"]) or len(ys) != len(t["labels"]):
            raise LwcompileError(f"the target graph takes {len(t['inputs'])} input(s) and {len(t['labels'])} label(s); "
                                 f"got {len(xs)} and {len(ys)}.")
        feed = dict(zip(t["params"], (self.params[p] for p in self.program["params"])))
        feed.update(zip(t["buffers"], (self.buffers[b] for b in self.program["buffers"])))
        feed.update(zip(t["inputs"], xs))
        feed.update(zip(t["labels"], ys))
        out = self._target.run_named(**feed)
        by_input = dict(zip(t["buffers"], self.program["buffers"]))
        return {"loss": out[t["loss"]],
                "inputs": {b: out[n] for b, n in t["block_inputs"].items()},
                "targets": {b: out[n] for b, n in t["targets"].items()},
                "grads": {p: out[n] for p, n in t["grads"].items()},
                "preacts": {b: out[n] for b, n in t.get("preacts", {}).items()},
                "offsets": {b: out[n] for b, n in t.get("offsets", {}).items()},
                "buffers": {by_input[src]: out[o] for o, src in self._mutates.items() if src in by_input}}

    def step(self, x: Any, y: Any) -> float:
        """One training step on inputs ``x`` and labels ``y`` (numpy arrays, tensors, or tuples of them); returns the
        task loss. Updates :attr:`params`, :attr:`buffers`, :attr:`inner_state` and the outer optimizer's state."""
        res = self.compute_targets(x, y)
        self._check("the task loss", res["loss"])
        for name, t in res["targets"].items():
            self._check(f"the target of block {name!r}", t)
        new_params, new_state = {}, {}
        for b in self.program["blocks"]:
            name = b["name"]
            # an inner graph's slot after x is "offset" (the target's offset, full precision) or "target"
            slot = res["offsets"][name] if "offset" in b["inputs"] else res["targets"][name]
            new = self._inner_loop(b, res["inputs"][name], res["targets"][name], res["preacts"].get(name), slot)
            for p, v in zip(b["params"], new[:len(b["params"])]):
                self._check(f"the new value of {p!r} (block {name!r})", v)
                new_params[p] = v
            new_state[name] = tuple(new[len(b["params"]):]) if name not in self._training else self.inner_state[name]
        self.params.update(new_params)
        self.inner_state.update(new_state)
        self.buffers.update(res["buffers"])
        if self.outer is not None:
            self.params.update(self.outer.step(self.params, res["grads"]))
        self.step_count += 1
        return float(res["loss"])

    def _inner_loop(self, b: Mapping[str, Any], x: np.ndarray, target: np.ndarray,
                    preact: np.ndarray | None = None, slot: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """New parameters (and inner state) of block ``b``: the training artifacts train on ``target``; the inner
        graph takes ``slot`` (its "offset" or "target" input; default ``target``)."""
        name, start = b["name"], [self.params[p] for p in b["params"]]
        if name in self._training:
            blk = self._training[name]
            blk.set_params(dict(zip(blk.params, start)))
            factors = self.program["inner"]["lr_factors"]  # the inner step schedule, as the exporter wrote it
            steps, lrs = len(factors), [self.effective_inner_lr * f for f in factors]
            new = blk.train(x, target, steps=steps, lr=lrs[0], lr_schedule=lrs)
            return tuple(new[k].reshape(s.shape) for k, s in zip(blk.params, start))
        g = self._inner[name]
        lr = np.asarray(self.effective_inner_lr, np.float32)
        z = [preact] if "preact" in b["inputs"] else []  # the forward pass's â, when the graph takes it
        slot = target if slot is None else slot
        vals = dict(zip(b["inputs"], [*start, x, slot, lr, *z, *self.inner_state[name]]))
        return g.run(**vals)

    @property
    def effective_inner_lr(self) -> float:
        """The next step's inner lr: ``inner_lr`` times the Config schedule's factor at ``step_count`` (the same
        pure function :class:`lwcompile.Program` applies, so an exported program continues its schedule)."""
        return self.inner_lr * schedule_factor(self._schedule, self.step_count)

    def _check(self, what: str, a: np.ndarray) -> None:
        if self.config.get("check_finite", True) and not np.isfinite(a).all():
            raise NonFiniteError(f"{what} has {int((~np.isfinite(a)).sum())} NaN/inf value(s); nothing was changed. "
                                 "Lower Config.gamma or the learning rates, or check the inputs and the loss.")

    # ------------------------------------------------------------------------------------------------ results
    def weights(self) -> dict[str, np.ndarray]:
        """Parameters and buffers by FQN (copies), as ``model.state_dict()`` names them."""
        return {k: v.copy() for k, v in (self.params | self.buffers).items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything a later run needs to continue exactly (see :mod:`lwcompile.runtime.ort_state`): torch
        tensors and plain values only, so ``torch.save`` / ``torch.load(weights_only=True)`` round-trip it."""
        return ort_state.state_dict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (made by :meth:`state_dict` on a run of a directory with the same manifest
        fingerprint; anything else is refused before a value changes)."""
        ort_state.load_state_dict(self, state)

    def write_back(self, model: Any) -> None:
        """Copy the trained parameters and buffers into a PyTorch model, by fully-qualified name."""
        import torch

        found, missing = {}, []
        for name, v in (self.params | self.buffers).items():
            try:
                found[name] = model.get_parameter(name) if name in self.params else model.get_buffer(name)
            except AttributeError:
                missing.append(name)
        if missing:
            raise LwcompileError(f"write_back: the model has no {missing[:5]} (of {len(missing)} names); pass a "
                                 f"model of the exported architecture ({type(model).__name__} given). Nothing was "
                                 "copied.")
        with torch.no_grad():
            for name, t in found.items():
                v = self.params[name] if name in self.params else self.buffers[name]
                t.copy_(torch.from_numpy(np.array(v)).reshape(t.shape).to(t.dtype))

