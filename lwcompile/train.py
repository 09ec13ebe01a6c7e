"""The training loop behind ``lwcompile train``: epochs of ``Program.step``, evaluation, checkpoints, a curve.

A factory returns a :class:`TrainJob` (the model, its loss, the training data and, optionally, evaluation data, a
metric function and a :class:`~lwcompile.Config`); :func:`train` compiles it, trains it with a tqdm bar, evaluates
every ``eval_every`` steps and at each epoch's end, writes ``checkpoint.pt`` every ``checkpoint_every`` steps and
at the end, and writes the curve as ``curve.csv`` and ``curve.png``.

Resuming is exact: a checkpoint holds the model's and the program's state dicts and the loop's position (epoch,
batch within it, the data-order and global RNG states, the curve so far), so a run stopped after k steps and
resumed writes the same curve, bit for bit, as the run that never stopped. Ctrl-C (SIGINT) finishes the current
step and stops with a checkpoint; a second Ctrl-C abandons the step (``Program.step`` is atomic) and stops the same
way. Evaluation and checkpoint writing are never interrupted halfway.

Example:
    >>> import torch, lwcompile
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> x = torch.randn(64, 4); y = x @ torch.randn(4, 2)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> job = lwcompile.TrainJob(model, torch.nn.functional.mse_loss, (x, y), batch_size=16, eval_data=(x, y),
    ...                          config=lwcompile.Config(inner_optimizer="adam", inner_lr=1e-2, steps=5))
    >>> result = train(job, TrainOptions(out_dir="run", epochs=3, progress=False))
    >>> result.steps, len(result.curve), result.curve[-1]["eval_loss"] < result.curve[0]["eval_loss"]
    (12, 13, True)
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lwcompile.config import Config
from lwcompile.errors import ConfigError, FileError, first_line
from lwcompile.train_data import Batches, evaluate, make_batches
from lwcompile.train_output import check_writable, write_checkpoint, write_csv, write_png

CHECKPOINT_FORMAT = "lwcompile-train/1"


@dataclass
class TrainJob:
    """What a training factory returns: ``lwcompile train MODULE:FACTORY`` calls ``FACTORY()`` and trains this.

    model:         the ``nn.Module`` to train (compiled with :func:`lwcompile.transform`).
    loss_fn:       ``loss_fn(output, *labels)`` -> the scalar task loss.
    train_data:    ``(inputs, labels)`` tensors (or tuples of tensors) with examples along dimension 0, batched
                   by ``batch_size`` in a shuffled order fixed by ``seed`` and the epoch; or a re-iterable with a
                   ``len()`` (a ``torch.utils.data.DataLoader``, a list) of ``(inputs, labels)`` batches.
    batch_size:    examples per step when ``train_data`` is tensors (required then; ignored otherwise).
    eval_data:     data of the same forms; the curve's ``eval_loss`` is the mean task loss over it.
    eval_fn:       ``eval_fn(model)`` -> a float (column ``eval``) or a dict of named floats (one column each).
    config:        the :class:`~lwcompile.Config` to compile with (default: ``Config()``).
    seed:          seeds the data order of tensor data (the command line also seeds torch with it first).

    Example:
        >>> import torch, lwcompile
        >>> job = lwcompile.TrainJob(torch.nn.Linear(3, 1), torch.nn.functional.mse_loss,
        ...                          (torch.randn(40, 3), torch.randn(40, 1)), batch_size=8)
        >>> job.config
        Config(target='md_post', ...)
    """

    model: nn.Module
    loss_fn: Callable[..., torch.Tensor]
    train_data: Any
    batch_size: int | None = None
    eval_data: Any = None
    eval_fn: Callable[[nn.Module], Any] | None = None
    config: Config | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise ConfigError(f"TrainJob.model must be an nn.Module, got {type(self.model).__name__}.")
        if not callable(self.loss_fn):
            raise ConfigError(f"TrainJob.loss_fn must be callable as loss_fn(output, *labels), got "
                              f"{type(self.loss_fn).__name__}.")
        if self.eval_fn is not None and not callable(self.eval_fn):
            raise ConfigError("TrainJob.eval_fn must be callable as eval_fn(model), got "
                              f"{type(self.eval_fn).__name__}.")
        self.config = Config() if self.config is None else self.config
        if not isinstance(self.config, Config):
            raise ConfigError(f"TrainJob.config must be an lwcompile.Config, got {type(self.config).__name__}.")


@dataclass
class TrainOptions:
    """How long to train and where to write (the command line's options; see ``lwcompile train --help``).

    ``steps`` (total optimizer steps) overrides ``epochs``; ``eval_every``/``checkpoint_every`` = 0 means only at
    each epoch's end / at the end; ``stop_after`` stops (as Ctrl-C does) once that many steps are done in all.
    """

    out_dir: str | os.PathLike = "runs/train"
    epochs: int = 1
    steps: int | None = None
    eval_every: int = 0
    checkpoint_every: int = 0
    resume: str | os.PathLike | None = None
    overwrite: bool = False
    stop_after: int | None = None
    progress: bool = True
    title: str = "lwcompile train"
    config_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    """What :func:`train` did: steps done in all, whether it stopped early, the curve rows and the files."""

    steps: int
    interrupted: bool
    curve: list[dict[str, Any]]
    checkpoint: Path
    csv: Path
    png: Path


class _Interrupts:
    """SIGINT while training: the first asks to stop after the current step; a second, during a step or while the
    next batch loads, raises KeyboardInterrupt there (the step is abandoned atomically)."""

    def __init__(self) -> None:
        self.requested = False
        self.abandonable = False
        self._previous: Any = None

    def __enter__(self) -> "_Interrupts":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and self.abandonable:
            raise KeyboardInterrupt
        if not self.requested:
            print("\nlwcompile train: stopping after this step (Ctrl-C again abandons it)", file=sys.stderr, flush=True)
        self.requested = True


def train(job: TrainJob, options: TrainOptions) -> TrainResult:
    """Compile ``job`` and train it as ``options`` say; see the module docstring. Returns a :class:`TrainResult`."""
    import lwcompile

    out = Path(options.out_dir)
    paths = {"checkpoint": out / "checkpoint.pt", "csv": out / "curve.csv", "png": out / "curve.png"}
    same_run = options.resume is not None and Path(options.resume).resolve() == paths["checkpoint"].resolve()
    if not same_run and not options.overwrite:  # a resumed run may only replace its own files
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing:
            raise ConfigError(f"{', '.join(existing)} already exist(s); pass --resume {paths['checkpoint']} to "
                              "continue that run, another --out directory, or --overwrite.")
    for name, low in (("epochs", 1), ("steps", 1), ("eval_every", 0), ("checkpoint_every", 0), ("stop_after", 1)):
        value = getattr(options, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ConfigError(f"{name}={value!r}: must be an int >= {low}.")
    check_writable(out, [p.name for p in paths.values()])  # now, not after the whole run
    data = make_batches(job.train_data, job.batch_size, job.seed, "train_data")
    evals = None if job.eval_data is None else make_batches(job.eval_data, job.batch_size or 1000, job.seed,
                                                            "eval_data")
    per_epoch = len(data)
    if per_epoch == 0:
        raise ConfigError("train_data yields no batch (fewer examples than batch_size?).")
    example_x, _ = data.example()
    config = job.config.replace(**options.config_overrides) if options.config_overrides else job.config
    prog = lwcompile.transform(job.model, job.loss_fn, example_x, config)
    loop: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "curve": [], "epoch_rng": None, "rng": None}
    if options.resume is not None:
        loop = _load_checkpoint(options.resume, job.model, prog)
    total = options.steps if options.steps is not None else options.epochs * per_epoch
    saved = {"epochs": options.epochs, "steps": options.steps, "eval_every": options.eval_every,
             "checkpoint_every": options.checkpoint_every}

    if loop["step"] == 0 and not loop["curve"] and (evals is not None or job.eval_fn is not None):
        row = {"step": 0, "epoch": 0, "batch": 0, "loss": None, "inner_lr": prog.effective_inner_lr}
        loop["curve"].append({**row, **evaluate(job.model, job.loss_fn, evals, job.eval_fn)})
    from tqdm import tqdm

    bar = tqdm(total=total, initial=min(loop["step"], total), unit="step", dynamic_ncols=True, file=sys.stderr,
               disable=not options.progress, desc=options.title)
    t_start, steps_start, interrupted = time.perf_counter(), loop["step"], False
    last_eval: dict[str, Any] = {}

    def checkpoint() -> None:
        write_checkpoint(paths["checkpoint"], _checkpoint(job.model, prog, loop, config, saved))

    with _Interrupts() as stop:
        while loop["step"] < total and not interrupted:
            batches = _position(data, loop)
            epoch_end = False
            while not (epoch_end or interrupted or loop["step"] >= total):
                count, loss = prog.step_count, None
                try:
                    stop.abandonable = True
                    batch, lr = next(batches, None), prog.effective_inner_lr
                    loss = None if batch is None else prog.step(*batch)
                except KeyboardInterrupt:  # a second Ctrl-C: Program.step is atomic, so this step never happened,
                    interrupted = True     # unless the step had just returned when the signal landed
                    if prog.step_count == count:
                        break
                    print("lwcompile train: the step had finished; its loss is not known", file=sys.stderr)
                finally:
                    stop.abandonable = False
                if batch is None:  # the data ran out before its len() said: the epoch ends here
                    loop["epoch"], loop["batch"] = loop["epoch"] + 1, 0
                    break
                row = {"step": loop["step"] + 1, "epoch": loop["epoch"], "batch": loop["batch"], "loss": loss,
                       "inner_lr": lr}
                loop["step"], loop["batch"] = loop["step"] + 1, loop["batch"] + 1
                epoch_end = loop["batch"] >= per_epoch
                if epoch_end:
                    loop["epoch"], loop["batch"] = loop["epoch"] + 1, 0
                due = (options.eval_every and loop["step"] % options.eval_every == 0) or epoch_end \
                    or loop["step"] == total
                if due and (evals is not None or job.eval_fn is not None):
                    row.update(evaluate(job.model, job.loss_fn, evals, job.eval_fn))
                loop["curve"].append(row)
                loop["rng"] = data.rng_state()
                bar.update(1)
                rate = (loop["step"] - steps_start) / max(time.perf_counter() - t_start, 1e-9)
                last_eval.update({k: v for k, v in row.items() if k.startswith("eval")})
                bar.set_postfix(_postfix({**row, **last_eval}, rate), refresh=False)
                if options.checkpoint_every and loop["step"] % options.checkpoint_every == 0:
                    checkpoint()
                if stop.requested or (options.stop_after is not None and loop["step"] >= options.stop_after):
                    interrupted = True
        bar.close()
        checkpoint()
        write_csv(paths["csv"], loop["curve"])
        write_png(paths["png"], loop["curve"], options.title)
    return TrainResult(loop["step"], interrupted, loop["curve"], paths["checkpoint"], paths["csv"], paths["png"])


def _position(data: Batches, loop: dict[str, Any]) -> Iterator[tuple[tuple, tuple]]:
    """The batches from the loop's position on, with every RNG as the uninterrupted run had it there.

    At an epoch's start the RNGs are those after the last step (``loop["rng"]``), recorded as the epoch's
    (``loop["epoch_rng"]``) before the data is iterated; in mid-epoch (a resumed run) the epoch's are restored,
    the data iterated again up to the position, then the ones after the last step put back.
    """
    if loop["batch"] == 0:
        if loop["rng"] is not None:
            data.set_rng_state(loop["rng"])
        loop["epoch_rng"] = data.rng_state()
        return iter(data.iterate(loop["epoch"]))
    data.set_rng_state(loop["epoch_rng"])
    batches = iter(data.iterate(loop["epoch"], start=loop["batch"]))
    data.set_rng_state(loop["rng"])
    return batches


def _postfix(row: dict[str, Any], rate: float) -> dict[str, str]:
    loss = "?" if row["loss"] is None else f"{row['loss']:.4g}"
    shown = {"loss": loss, "inner_lr": f"{row['inner_lr']:.3g}", "steps/s": f"{rate:.3g}"}
    for key, value in row.items():
        if key.startswith("eval") and isinstance(value, float):
            shown[key] = f"{value:.4g}"
    return shown


def _checkpoint(model: nn.Module, prog: Any, loop: dict[str, Any], config: Config,
                options: dict[str, Any]) -> dict[str, Any]:
    return {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "program": prog.state_dict(),
            "loop": {k: loop[k] for k in ("epoch", "batch", "step", "curve", "epoch_rng", "rng")},
            "config": repr(config), "options": options}


def saved_options(path: str | os.PathLike) -> dict[str, Any]:
    """The ``epochs``, ``steps``, ``eval_every`` and ``checkpoint_every`` of the run saved in checkpoint ``path``."""
    return dict(_read(path)["options"])


_LOOP_KEYS = ("epoch", "batch", "step", "curve", "epoch_rng", "rng")


def _read(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint at ``path``, checked to be one of lwcompile train's; :class:`FileError` naming the file and
    the problem otherwise (damaged, truncated, not torch's, another program's)."""
    if not os.path.isfile(path):
        raise FileError(f"{path}: no such file; pass a checkpoint.pt written by lwcompile train to --resume.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a zip reader's RuntimeError, an unpickler's error, EOFError, ...: all mean unreadable
        raise FileError(f"{path}: not a readable checkpoint (damaged, truncated or not written by torch.save: "
                        f"{first_line(e)}); pass a checkpoint.pt written by lwcompile train to --resume.") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise FileError(f"{path}: not a checkpoint of lwcompile train (format {CHECKPOINT_FORMAT}); pass a "
                        "checkpoint.pt written by lwcompile train to --resume.")
    kinds = {"model": dict, "program": dict, "loop": dict, "options": dict}
    bad = [k for k, kind in kinds.items() if not isinstance(state.get(k), kind)]
    bad += [f"loop.{k}" for k in _LOOP_KEYS if isinstance(state.get("loop"), dict) and k not in state["loop"]]
    if bad:
        raise FileError(f"{path}: a damaged checkpoint of lwcompile train: {', '.join(bad)} missing or malformed.")
    return state


def _load_checkpoint(path: str | os.PathLike, model: nn.Module, prog: Any) -> dict[str, Any]:
    """Load checkpoint ``path`` into ``model`` and ``prog``, or refuse (:class:`FileError`) changing neither."""
    from lwcompile.errors import LwcompileError

    state = _read(path)
    now, saved = model.state_dict(), state["model"]
    problems = [f"{k} missing" for k in now if k not in saved] + [f"unexpected {k}" for k in saved if k not in now]
    problems += [f"{k} is {_layout(saved[k])} in the checkpoint but {_layout(v)} here" for k, v in now.items()
                 if k in saved and (not isinstance(saved[k], torch.Tensor) or saved[k].shape != v.shape)]
    if problems:
        raise FileError(f"{path}: saved from another model ({'; '.join(problems[:5])}"
                        f"{'; ...' if len(problems) > 5 else ''}); resume it with the job it was saved from.")
    try:  # the program checks everything before it changes anything, so it goes first
        prog.load_state_dict(state["program"])
    except LwcompileError as e:
        raise FileError(f"{path}: {e}") from e
    model.load_state_dict(saved)
    return dict(state["loop"])


def _layout(t: Any) -> str:
    return f"{list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
