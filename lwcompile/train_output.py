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
    """Plot the training loss per step and each evaluated column at its steps; log y when every value is > 0."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    positive = True
    for name in _columns(rows):
        if name != "loss" and not name.startswith("eval"):
            continue
        points = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), float) and math.isfinite(r[name])]
        if not points:
            continue
        steps, values = zip(*points)
        positive &= min(values) > 0
        label = "train loss (batch)" if name == "loss" else name
        ax.plot(steps, values, "-" if name == "loss" else "o-", label=label, lw=1 if name == "loss" else 1.5,
                ms=4, alpha=0.8 if name == "loss" else 1.0)
    if positive and ax.lines:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("value")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    with _atomic(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
