"""Data loaders, batching, the task loss and the model builders (lwcompile.experiments: data.py, models.py)."""
from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lwcompile.experiments.data import (
    batches, find_default_mnist_dir, load_digits_images, load_digits_labels, load_images, load_mnist,
    load_mnist_labels,
)
from lwcompile.experiments.models import deep_autoencoder, mlp, sigmoid_xent_sum, small_cnn


def _write_idx(path: Path, arr: np.ndarray, magic: int | None = None) -> None:
    """Write `arr` (uint8) as an idx file; `magic` overrides the header's magic number."""
    magic = (0x0800 | arr.ndim) if magic is None else magic
    payload = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)


def _random_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


# --- idx loader -----------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_returns_bytes_over_255(tmp_path: Path, gz: bool) -> None:
    imgs = _random_images(7, seed=1)
    imgs[0, 0, 0], imgs[0, 0, 1] = 0, 255  # make sure both ends of the range are present
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", imgs)
    x = load_mnist(tmp_path, "train")
    assert x.dtype == torch.float32 and tuple(x.shape) == (7, 784)
    expected = imgs.reshape(7, 784).astype(np.float64) / 255.0
    np.testing.assert_allclose(x.numpy(), expected, rtol=0, atol=1e-7)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_load_mnist_test_split_and_labels(tmp_path: Path) -> None:
    imgs, labels = _random_images(3, seed=2), np.array([3, 1, 4], dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)
    assert torch.equal(load_mnist(str(tmp_path), "test") * 255, torch.from_numpy(imgs.reshape(3, -1)).float())
    assert load_mnist_labels(tmp_path, "test").tolist() == [3, 1, 4]


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        load_mnist(tmp_path, "train")
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and "train-images-idx3-ubyte.gz" in msg and "--data-dir" in msg


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_mnist(tmp_path / "nowhere", "test")
    # A named directory is never silently swapped for the fallback.
    with pytest.raises(FileNotFoundError):
        load_images(tmp_path / "nowhere", "train")


def test_bad_magic_raises(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    _write_idx(path, _random_images(2, seed=3), magic=0x0801)  # a labels magic on an images file
    with pytest.raises(ValueError, match="magic") as e:
        load_mnist(tmp_path)
    assert str(path) in str(e.value)


def test_truncated_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    _write_idx(path, _random_images(2, seed=4))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path)


def test_bad_split() -> None:
    with pytest.raises(ValueError, match="split"):
        load_digits_images("validation")  # type: ignore[arg-type]


# --- the real data --------------------------------------------------------------------------------

def test_real_mnist_shapes() -> None:
    d = find_default_mnist_dir()
    if d is None:
        pytest.skip("MNIST not found at ../shared/data/mnist relative to the project root")
    xtr, xte = load_mnist(d, "train"), load_mnist(d, "test")
    assert tuple(xtr.shape) == (60000, 784) and tuple(xte.shape) == (10000, 784)
    for x in (xtr, xte):
        assert x.dtype == torch.float32 and float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert tuple(load_mnist_labels(d, "train").shape) == (60000,)
    x, name = load_images("auto", "test")
    assert name == "mnist" and torch.equal(x, xte)


def test_digits_fallback() -> None:
    xtr, xte = load_digits_images("train"), load_digits_images("test")
    assert tuple(xtr.shape) == (1437, 64) and tuple(xte.shape) == (360, 64)
    assert xtr.dtype == torch.float32 and 0.0 <= float(xtr.min()) and float(xtr.max()) == 1.0
    assert load_digits_labels("train").shape[0] == 1437
    assert torch.equal(load_digits_images("train"), xtr)  # deterministic split
    x, name = load_images(None, "train")
    assert name == "digits" and torch.equal(x, xtr)


# --- batching -------------------------------------------------------------------------------------

def test_batches_deterministic_permutation() -> None:
    x = torch.arange(103, dtype=torch.float32).unsqueeze(1)
    run = lambda epoch, seed: [b.clone() for b in batches(x, 10, epoch=epoch, seed=seed)]  # noqa: E731
    a = run(0, 0)
    torch.manual_seed(123)  # global RNG state must not matter
    assert all(torch.equal(p, q) for p, q in zip(a, run(0, 0)))
    assert len(a) == 10 and all(b.shape == (10, 1) for b in a)  # drop_last: 103 -> 10 batches
    seen = torch.cat(a).flatten().long().tolist()
    assert len(set(seen)) == 100 and set(seen) <= set(range(103))  # no repeats: part of a permutation
    assert torch.cat(a).flatten().tolist() != torch.cat(run(1, 0)).flatten().tolist()  # epochs differ
    assert torch.cat(a).flatten().tolist() != torch.cat(run(0, 1)).flatten().tolist()  # seeds differ
    xs = torch.arange(20.).unsqueeze(1)
    full = sorted(torch.cat(list(batches(xs, 5, epoch=3, seed=7))).flatten().tolist())
    assert full == list(range(20))  # divisible size: exactly a permutation


# --- loss and models ------------------------------------------------------------------------------

def test_sigmoid_xent_sum_matches_float64() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 12, generator=g) * 4
    target = torch.rand(5, 12, generator=g)
    z, t = logits.double().numpy(), target.double().numpy()
    p = 1.0 / (1.0 + np.exp(-z))
    expected = -(t * np.log(p) + (1 - t) * np.log(1 - p)).sum() / 5
    assert math.isclose(float(sigmoid_xent_sum(logits, target)), expected, rel_tol=1e-5)


def test_autoencoder_structure_and_glorot() -> None:
    m = deep_autoencoder()
    linears = [l for l in m if isinstance(l, torch.nn.Linear)]
    assert [l.in_features for l in linears] + [linears[-1].out_features] == [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    names = [type(l).__name__ for l in m]
    # tanh after every hidden layer but the 30-unit code; nothing after the output.
    assert names == ["Linear", "Tanh", "Linear", "Tanh", "Linear", "Tanh", "Linear",
                     "Linear", "Tanh", "Linear", "Tanh", "Linear", "Tanh", "Linear"]
    for l in linears:
        bound = math.sqrt(6.0 / (l.in_features + l.out_features))
        w = l.weight.detach()
        assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.95 * bound  # fills U(-a, a)
        assert abs(float(w.std()) - bound / math.sqrt(3)) < 0.05 * bound
        assert torch.count_nonzero(l.bias) == 0
    # The same seed gives the same weights, whatever the global RNG did.
    torch.manual_seed(99)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), deep_autoencoder(seed=0).parameters()))
    assert not torch.equal(linears[0].weight, deep_autoencoder(seed=1)[0].weight)


def test_autoencoder_loss_at_init_is_plausible() -> None:
    x = load_digits_images("test")
    m = deep_autoencoder((64, 32, 16, 8, 16, 32, 64))
    with torch.no_grad():
        loss = float(sigmoid_xent_sum(m(x), x))
    assert 64 * 0.3 < loss < 64 * 1.5  # near 64 * (entropy of sigmoid(~0)) at init


def test_small_models() -> None:
    assert small_cnn(seed=0)(load_digits_images("test")[:4]).shape == (4, 10)
    net = mlp([64, 16, 10], act="tanh", seed=0)
    assert [type(l).__name__ for l in net] == ["Linear", "Tanh", "Linear"]
    with pytest.raises(ValueError, match="act"):
        mlp([2, 2], act="swish")
