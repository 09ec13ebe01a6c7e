"""The files ``lwcompile train`` writes: the checkpoint, the curve as CSV and as a PNG plot.

Each file is written whole or not at all: into a temporary file beside it (a name of its own, ``.<name>.tmp-<pid>``)
that then replaces it, so a crash or a Ctrl-C mid-write never leaves a torn checkpoint. Only these names are ever
written or replaced.

Example:
    >>> rows = [{"step": 0, "loss": float("nan"), "eval_loss": 2.0}, {"step": 1, "loss": 1.5, "eval_loss": 1.0}]
    >>> write_csv("curve.csv", rows); print(open("curve.csv").read().strip())
    step,loss,eval_loss
    0,nan,2.0
    1,1.5,1.0
    >>> read_csv("curve.csv") == [{"step": "0", "loss": "nan", "eval_loss": "2.0"},
    ...                           {"step": "1", "loss": "1.5", "eval_loss": "1.0"}]
    True
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import torch

from lwcompile.errors import FileError


def check_writable(out_dir: str | os.PathLike, names: Sequence[str]) -> None:
    """Refuse, before any training, an output folder the run could not write its files ``names`` into at the end.

    Raises :class:`~lwcompile.errors.FileError` (``"<path>: <problem>"``) when ``out_dir`` or a folder above it
    is not a folder, when the folder to create it in (or it) is not writable, or when an output name is a folder.

    Example:
        >>> open("a_file", "w").close()
        >>> check_writable("a_file", ["curve.csv"])
        Traceback (most recent call last):
        lwcompile.errors.FileError: a_file: exists and is not a folder; pass a folder (or a new name) to --out.
    """
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise FileError(f"{out}: exists and is not a folder; pass a folder (or a new name) to --out.")
        for name in names:
            if (out / name).is_dir():
                raise FileError(f"{out / name}: is a folder; lwcompile train writes a file of that name there.")
        if not os.access(out, os.W_OK | os.X_OK):
            raise FileError(f"{out}: not writable; pass a folder you can write to --out.")
        return
    parent = out.parent  # the nearest existing folder above: it is where the run's mkdir will happen
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise FileError(f"{out}: cannot be created, {parent} is not a folder; pass another --out.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FileError(f"{out}: cannot be created, {parent} is not writable; pass another --out.")


@contextlib.contextmanager
def _atomic(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # only ever our own temporary file
            tmp.unlink()


def write_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """``torch.save(state)`` to ``path``, atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with _atomic(path, "wb") as f:
        f.write(buffer.getvalue())


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for row in rows:
        names.extend(k for k in row if k not in names)
    return names


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """One row per step; floats exactly (``repr``), a missing value empty (e.g. ``eval_loss`` between evaluations)."""
    with _atomic(path) as f:
        writer = csv.DictWriter(f, fieldnames=_columns(rows) or ["step"], restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a curve CSV, as strings."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def write_png(path: str | os.PathLike, rows: Sequence[dict[str, Any]], title: str) -> None:
    """Plot the training loss per step with ``eval_loss`` at its steps (log scale when all > 0) and, in a second
    panel, every other evaluated column (``eval_accuracy``, ...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(name: str) -> tuple[tuple, tuple]:
        points = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), float) and math.isfinite(r[name])]
        return tuple(zip(*points)) if points else ((), ())

    columns = _columns(rows)
    metrics = [c for c in columns if c.startswith("eval") and c != "eval_loss" and series(c)[0]]
    fig = Figure(figsize=(7, 4.2 + 2.2 * bool(metrics)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1 + bool(metrics), 1, sharex=True, squeeze=False)[:, 0]
    losses = [(c, series(c)) for c in ("loss", "eval_loss") if c in columns and series(c)[0]]
    for name, (steps, values) in losses:
        axes[0].plot(steps, values, "-" if name == "loss" else "o-", lw=1 if name == "loss" else 1.5, ms=4,
                     label="train loss (batch)" if name == "loss" else "eval_loss")
    if losses and min(v for _, (_, vs) in losses for v in vs) > 0:
        from matplotlib.ticker import FuncFormatter

        axes[0].set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:.3g}")  # 400, not 4 × 10²
        axes[0].yaxis.set_major_formatter(plain)
        axes[0].yaxis.set_minor_formatter(plain)
    axes[0].set_ylabel("loss")
    axes[0].set_title(title)
    for name in metrics:
        axes[1].plot(*series(name), "o-", ms=4, label=name)
    if metrics:
        axes[1].set_ylabel("metric")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend()
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    with _atomic(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
