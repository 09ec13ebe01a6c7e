"""onnxruntime sessions for single exported files: ``OrtGraph(path)`` runs one standalone ONNX graph made by
:mod:`lwcompile.passes.onnx_export`; ``OrtTrainingBlock(artifacts_dir)`` runs one block's inner loop with
onnxruntime-training (CheckpointState, Module, Optimizer) from the artifacts of
:func:`lwcompile.passes.onnx_training.export_training_artifacts`. :class:`lwcompile.runtime.ort.OrtProgram`
combines them into whole training steps.

Example:
    >>> to_numpy([1.0, 2.0], np.float32).dtype
    dtype('float32')
    >>> g = OrtGraph("out/target.onnx")                     # doctest: +SKIP
    >>> blk = OrtTrainingBlock("out/training/fc1")           # doctest: +SKIP
    >>> w = blk.train(x, target, steps=10, lr=1e-3)          # {"weight": ..., "bias": ...}  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from lwcompile.errors import FileError, LwcompileError
from lwcompile.safe_paths import inside
from lwcompile.ir import MUTATED_PREFIX


_NP_OF_ONNX = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def to_numpy(x: Any, dtype=None) -> np.ndarray:
    """A numpy array from a numpy array, a torch tensor (any device, detached) or a Python scalar."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if dtype is not None and a.dtype != dtype:
        a = a.astype(dtype)
    return a if a.flags.c_contiguous else np.array(a, order="C")  # (ascontiguousarray makes 0-d arrays 1-d)


def _ort():
    import onnxruntime
    return onnxruntime


class OrtGraph:
    """An exported graph in an ``onnxruntime.InferenceSession`` on CPU.

    Call with positional inputs (in graph order) or keywords (by input name); numpy arrays or torch tensors are
    accepted and cast to the graph's input dtypes. Returns a tuple of numpy arrays (``run``) or torch tensors
    (``run_torch``). Outputs named ``new__X`` are the new values of in-place-mutated inputs ``X``;
    ``run_torch(..., write_back=True)`` copies them into the torch tensors passed as ``X`` and drops them from the
    result, reproducing the GraphModule's in-place semantics.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None):
        ort = _ort()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, sess_options=opts, providers=list(providers))
        self.inputs = self.session.get_inputs()
        self.input_names = [i.name for i in self.inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._dtypes = [_NP_OF_ONNX.get(i.type) for i in self.inputs]
        self._shapes = [tuple(i.shape) for i in self.inputs]

    def _feed(self, args, kwargs) -> dict[str, np.ndarray]:
        if len(args) > len(self.input_names):
            raise TypeError(f"{self.path}: {len(args)} inputs given, the graph takes {len(self.input_names)}")
        vals = dict(zip(self.input_names, args))
        for k, v in kwargs.items():
            if k not in self.input_names:
                raise TypeError(f"{self.path}: no input named {k!r}; inputs: {self.input_names}")
            vals[k] = v
        missing = [n for n in self.input_names if n not in vals]
        if missing:
            raise TypeError(f"{self.path}: missing inputs {missing}")
        feed = {n: to_numpy(vals[n], dt) for n, dt in zip(self.input_names, self._dtypes)}
        for (n, a), want in zip(feed.items(), self._shapes):
            if len(a.shape) != len(want) or any(isinstance(w, int) and w != d for w, d in zip(want, a.shape)):
                raise LwcompileError(f"{os.path.basename(self.path)}: input {n!r} has shape {list(a.shape)}, but the "
                                     f"graph was exported for {list(want)} (exported graphs have static shapes: "
                                     "export again with example inputs of this shape).")
        return feed

    def run(self, *args, **kwargs) -> tuple[np.ndarray, ...]:
        return tuple(self.session.run(None, self._feed(args, kwargs)))

    __call__ = run

    def run_named(self, *args, **kwargs) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.run(*args, **kwargs)))

    def run_torch(self, *args, write_back: bool = False, **kwargs):
        import torch
        outs = self.run(*args, **kwargs)
        res = []
        given = dict(zip(self.input_names, args))
        given.update(kwargs)
        for name, o in zip(self.output_names, outs):
            t = torch.from_numpy(np.array(o))
            if write_back and name.startswith(MUTATED_PREFIX):
                dst = given.get(name[len(MUTATED_PREFIX):])
                if isinstance(dst, torch.Tensor):
                    with torch.no_grad():
                        dst.copy_(t.to(dst.device, dst.dtype))
                    continue
            res.append(t)
        return tuple(res)


class OrtTrainingBlock:
    """One block's inner loop in onnxruntime-training.

    ``train(x, target, steps, lr, weight_ref=...)`` runs ``steps`` train_step + optimizer.step (the batch and
    target fixed, METHOD.md step 4) and returns the new parameters. ``weight_ref``/``bias_ref`` (the frozen W0 of
    the proximal term) default to the parameters at the start of the call. ``set_params`` loads new starting
    weights (the block's weights at the next outer step); optimizer state is kept across calls.
    """

    def __init__(self, artifacts_dir: str | os.PathLike):
        from onnxruntime.training.api import CheckpointState, Module, Optimizer
        d = str(artifacts_dir)
        self.dir = d
        path = {}
        for name in ("lwblock.json", "checkpoint", "training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
            path[name] = inside(d, name)  # a link leading out of the artifacts folder is never followed
            if path[name] is None:
                raise FileError(f"{os.path.join(d, name)}: leads outside {d}; export the directory again.")
        with open(path["lwblock.json"]) as fh:
            self.info = json.load(fh)
        _ort().set_default_logger_severity(3)
        self.state = CheckpointState.load_checkpoint(path["checkpoint"])
        self.module = Module(path["training_model.onnx"], self.state, path["eval_model.onnx"], device="cpu")
        self.optimizer = Optimizer(path["optimizer_model.onnx"], self.module)
        self.params = list(self.info["params"])
        self.input_names = list(self.module.input_names())

    # ---- parameters
    def get_params(self) -> dict[str, np.ndarray]:
        return {p: np.array(self.state.parameters[p].data) for p in self.params}

    def set_params(self, params: Mapping[str, Any] | None = None, **kw) -> None:
        vals = dict(params or {}, **kw)
        for k, v in vals.items():
            if k not in self.params:
                raise KeyError(f"{self.dir}: no parameter {k!r}; parameters: {self.params}")
            cur = self.state.parameters[k].data
            self.state.parameters[k] = to_numpy(v, np.float32).reshape(cur.shape)

    # ---- steps
    def _inputs(self, x, target, refs: Mapping[str, Any]) -> list[np.ndarray]:
        vals = {"x": to_numpy(x, np.float32), "target": to_numpy(target, np.float32)}
        for p in self.params:
            vals[p + "_ref"] = to_numpy(refs[p], np.float32)
        return [vals[n] for n in self.input_names]

    def step(self, x, target, lr: float | None = None, refs: Mapping[str, Any] | None = None) -> float:
        """One train_step + optimizer step; returns the local loss (before the step)."""
        if lr is not None:
            self.optimizer.set_learning_rate(float(lr))
        refs = refs if refs is not None else self.get_params()
        self.module.train()
        loss = self.module(*self._inputs(x, target, refs))
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return float(np.asarray(loss))

    def train(self, x, target, steps: int, lr: float, weight_ref=None, bias_ref=None,
              lr_schedule: Sequence[float] | None = None) -> dict[str, np.ndarray]:
        """``steps`` inner iterations; ``lr_schedule[k]`` (if given) overrides ``lr`` at iteration k."""
        start = self.get_params()
        refs = dict(start)
        if weight_ref is not None:
            refs["weight"] = weight_ref
        if bias_ref is not None and "bias" in refs:
            refs["bias"] = bias_ref
        refs = {k: to_numpy(v, np.float32) for k, v in refs.items()}
        self.losses = []
        for k in range(int(steps)):
            self.losses.append(self.step(x, target, lr if lr_schedule is None else lr_schedule[k], refs))
        return self.get_params()

    def loss(self, x, target, refs: Mapping[str, Any] | None = None) -> float:
        """The local loss (plus proximal term) at the current parameters, via the eval model."""
        refs = refs if refs is not None else self.get_params()
        self.module.eval()
        out = self.module(*self._inputs(x, target, refs))
        self.module.train()
        return float(np.asarray(out))
