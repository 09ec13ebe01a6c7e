"""Data for the reference experiment: MNIST from idx files, or scikit-learn's 8x8 digits as a fallback.

Everything here is numpy/torch only (no torchvision, no downloads), so it works offline on any machine.

>>> x, name = load_images(None, "train")   # no MNIST given -> bundled digits
>>> name, tuple(x.shape)
('digits', (1437, 64))
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch

Split = Literal["train", "test"]

# idx "magic" numbers: 0x00000803 = unsigned bytes, 3 dims (images); 0x00000801 = 1 dim (labels).
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049
_PREFIX = {"train": "train", "test": "t10k"}
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0


def _check_split(split: str) -> None:
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _find_idx(data_dir: str | Path, stem: str) -> Path:
    """Return the path of `stem` or `stem.gz` in `data_dir`, or raise FileNotFoundError naming both."""
    d = Path(data_dir).expanduser()
    candidates = [d / stem, d / f"{stem}.gz"]
    for p in candidates:
        if p.is_file():
            return p
    where = "directory does not exist" if not d.is_dir() else "neither file exists"
    raise FileNotFoundError(
        f"MNIST file not found ({where}): looked for {candidates[0]} and {candidates[1]}. "
        f"Pass --data-dir pointing at a directory holding the standard MNIST idx files "
        f"(plain or .gz), or omit it to use scikit-learn's bundled 8x8 digits."
    )


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an idx file (plain or gzip) of unsigned bytes; check its magic number and size."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise ValueError(f"{path}: too short to be an idx file ({len(raw)} bytes)")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise ValueError(
            f"{path}: bad idx magic number {got:#010x}, expected {magic:#010x}; "
            f"is this really an MNIST {'images' if magic == _IMAGES_MAGIC else 'labels'} file?"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims)) if dims else 0
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes) but holds {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_mnist(data_dir: str | Path, split: Split = "train") -> torch.Tensor:
    """MNIST images from the standard idx files in `data_dir`, as float32 N x 784 in [0, 1].

    Reads `train-images-idx3-ubyte[.gz]` or `t10k-images-idx3-ubyte[.gz]`.

    >>> import tempfile; d = tempfile.mkdtemp()
    >>> load_mnist(d)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    FileNotFoundError: MNIST file not found ...
    """
    _check_split(split)
    arr = _read_idx(_find_idx(data_dir, f"{_PREFIX[split]}-images-idx3-ubyte"), _IMAGES_MAGIC)
    # Copy (frombuffer is read-only) and divide in float32: exactly byte/255.
    return torch.from_numpy(arr.reshape(arr.shape[0], -1).astype(np.float32) / np.float32(255.0))


def load_mnist_labels(data_dir: str | Path, split: Split = "train") -> torch.Tensor:
    """MNIST labels (int64, N) from `train-labels-idx1-ubyte[.gz]` / `t10k-labels-idx1-ubyte[.gz]`.

    >>> d = find_default_mnist_dir()
    >>> d is None or load_mnist_labels(d, "test").shape == (10000,)
    True
    """
    _check_split(split)
    arr = _read_idx(_find_idx(data_dir, f"{_PREFIX[split]}-labels-idx1-ubyte"), _LABELS_MAGIC)
    return torch.from_numpy(arr.astype(np.int64))


def _digits_split(split: Split) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # imported lazily: sklearn is slow to import
    from sklearn.model_selection import train_test_split

    _check_split(split)
    ds = load_digits()
    # Fixed seed and stratification: the same split on every machine and run.
    xtr, xte, ytr, yte = train_test_split(
        ds.data, ds.target, test_size=_DIGITS_TEST_FRACTION,
        random_state=_DIGITS_SPLIT_SEED, stratify=ds.target,
    )
    return (xtr, ytr) if split == "train" else (xte, yte)


def load_digits_images(split: Split = "train") -> torch.Tensor:
    """scikit-learn's bundled 8x8 digits (no download) as float32 N x 64 in [0, 1]; fixed 80/20 split.

    >>> tuple(load_digits_images("test").shape)
    (360, 64)
    """
    x, _ = _digits_split(split)
    # Pixel values are 0..16 in sklearn's digits.
    return torch.from_numpy((x / 16.0).astype(np.float32))


def load_digits_labels(split: Split = "train") -> torch.Tensor:
    """Labels (int64) matching `load_digits_images(split)` row for row.

    >>> load_digits_labels("train").shape
    torch.Size([1437])
    """
    _, y = _digits_split(split)
    return torch.from_numpy(y.astype(np.int64))


def project_root() -> Path:
    """The repository root: the parent of the `lwcompile/` package directory (this file: lwcompile/experiments/)."""
    return Path(__file__).resolve().parents[2]


def find_default_mnist_dir() -> Path | None:
    """`../shared/data/mnist` relative to the project root if that directory exists, else None.

    >>> d = find_default_mnist_dir(); d is None or d.name == "mnist"
    True
    """
    d = (project_root().parent / "shared" / "data" / "mnist").resolve()
    return d if d.is_dir() else None


def load_images(data_dir: str | Path | None = None, split: Split = "train") -> tuple[torch.Tensor, str]:
    """Images for training/evaluation and the data set's name ("mnist" or "digits").

    `data_dir` = a directory -> MNIST from it (errors if files are missing: a named directory is never
    silently replaced); "auto" -> MNIST from `find_default_mnist_dir()` if present, else digits;
    None -> the bundled digits.

    >>> x, name = load_images(None, "test"); name, x.shape[1]
    ('digits', 64)
    """
    if data_dir is None:
        return load_digits_images(split), "digits"
    if str(data_dir) == "auto":
        d = find_default_mnist_dir()
        if d is None:
            return load_digits_images(split), "digits"
        return load_mnist(d, split), "mnist"
    return load_mnist(data_dir, split), "mnist"


def batches(x: torch.Tensor, batch_size: int, epoch: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Shuffled minibatches of the rows of `x`, the same for the same (seed, epoch); the last partial batch is dropped.

    >>> x = torch.arange(10.).unsqueeze(1)
    >>> [b.shape[0] for b in batches(x, 4, epoch=0)]
    [4, 4]
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    # A private generator seeded from (seed, epoch): order independent of global RNG state and of
    # how many epochs ran before (so resumed runs see the same data order).
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    perm = torch.randperm(x.shape[0], generator=g)
    for i in range(x.shape[0] // batch_size):
        yield x[perm[i * batch_size:(i + 1) * batch_size]]
