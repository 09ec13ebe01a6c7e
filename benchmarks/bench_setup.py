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


def write_outputs(out: Path, res: dict[str, Any], md: str, plots: dict[str, Callable[[Path], None]]) -> None:
    """``results.md``, ``results.json`` and one plot per entry of ``plots`` (file name -> a function writing it
    to the path it is given) in ``out`` (created), then the table to stdout: :func:`write_results` for several
    plots."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    for name, draw in plots.items():
        draw(out / name)
    print(md)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}" + "".join(f", {out / n}" for n in plots))


class MemoryWindow:
    """Peak bytes of CPU tensor memory allocated inside a window, from PyTorch's own allocation records.

    Everything allocated since the window opened and still alive counts (the model, an optimizer's state, what
    a compiled program keeps), plus what is allocated and freed inside a marked region (a step's activations and
    temporaries); memory allocated before the window (the data set) does not. ``peak(name)`` is the highest live
    total while region ``name`` ran. It reads ``torch.profiler.profile(profile_memory=True)``'s records (the
    allocator reports every allocation and free to it, on CPU as on GPU); None when a region never ran or this
    torch does not expose the records.

    Example:
        >>> with MemoryWindow() as w:
        ...     a = torch.zeros(1000)  # 4000 bytes, alive through the region
        ...     with w.region("work"):
        ...         b = torch.zeros(2000); del b  # 8000 bytes, freed again
        >>> w.peak("work")
        12000
    """

    def __init__(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._events: list[Any] | None = None

    def __enter__(self) -> "MemoryWindow":
        self._prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._prof.__exit__(*exc)
        try:
            self._events = list(self._prof.profiler.kineto_results.events())
        except AttributeError:  # a torch without the raw records: peaks are unknown, never guessed
            self._events = None

    def region(self, name: str) -> Any:
        from torch.profiler import record_function

        return record_function(f"memwin::{name}")

    def live_before(self, name: str) -> int | None:
        """Bytes alive (allocated inside the window) when region ``name`` last began; None as for :meth:`peak`."""
        if self._events is None:
            return None
        starts = [e.start_ns() for e in self._events if e.name() == f"memwin::{name}"]
        if not starts:
            return None
        return sum(e.nbytes() for e in self._events if e.name() == "[memory]" and e.start_ns() < starts[-1])

    def peak(self, name: str) -> int | None:
        if self._events is None:
            return None
        spans = [(e.start_ns(), e.end_ns()) for e in self._events if e.name() == f"memwin::{name}"]
        if not spans:
            return None
        start, end = spans[-1]
        live, peak = 0, None
        for t, nbytes in sorted((e.start_ns(), e.nbytes()) for e in self._events if e.name() == "[memory]"):
            if t > end:
                break
            live += nbytes
            if t >= start:
                peak = live if peak is None else max(peak, live)
        return live if peak is None else peak
