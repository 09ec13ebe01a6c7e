"""What the autoencoder benchmarks share: torch's settings, the training images and net for ``--data-dir``/``--quick``,
and writing ``results.md``/``results.json``/a plot.

Example:
    >>> x, name, sizes, batch = load_autoencoder_data("digits", quick=True)
    >>> name, sizes, batch, x.shape[1]
    ('digits', (64, 32, 16, 8, 16, 32, 64), 100, 64)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from backprop_baselines import DIGITS_SIZES
from lwcompile.experiments.data import load_images
from lwcompile.experiments.models import AUTOENCODER_SIZES


def setup_torch(threads: int = 0) -> None:
    """``threads`` intra-op threads (0: torch's default) and denormals flushed, as every benchmark runs."""
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def data_source(data_dir: str, quick: bool) -> str | None:
    """The ``load_images`` argument for ``--data-dir`` ("auto": MNIST if present; ``--quick``: digits)."""
    arg = "digits" if quick and data_dir == "auto" else data_dir
    return None if arg in ("digits", "none", "") else arg


def load_autoencoder_data(data_dir: str, quick: bool = False) -> tuple[torch.Tensor, str, tuple[int, ...], int]:
    """(training images, data name, the net's layer sizes, batch size): the paper's 784-…-784 net at batch 1000 on
    MNIST, the same shape scaled to 8×8 digits at batch 100 otherwise."""
    x_train, name = load_images(data_source(data_dir, quick), "train")
    sizes, batch = (AUTOENCODER_SIZES, 1000) if name == "mnist" else (DIGITS_SIZES, 100)
    return x_train, name, tuple(sizes), batch


def write_results(out: Path, res: dict[str, Any], md: str, plot: Callable[[dict[str, Any], Path], None],
                  png: str) -> None:
    """``results.md``, ``results.json`` and the plot ``png`` in ``out`` (created), then the table to stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    plot(res, out / png)
    print(md)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / png}")
