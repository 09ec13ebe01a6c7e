"""The workloads users bring, as one table of rows: model, task loss, data, batch size and loss targets.

Each :class:`Workload` builds its model from a seed (a private generator, so the global RNG is untouched) and
loads its data from disk only: MNIST from a directory of idx files (``../shared/data/mnist`` beside the
repository by default, scikit-learn's 8×8 digits when it is missing) and, for the language model, Python's own
standard-library sources (:func:`stdlib_text`), so nothing is downloaded.

Example:
    >>> w = WORKLOADS["mlp"].load("digits")
    >>> model = w.build(seed=0)
    >>> xb, yb = w.batch(0)
    >>> tuple(model(xb).shape), w.batch_size, round(w.eval_loss(model), 1) > 0
    ((256, 10), 256, True)
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lwcompile.experiments.data import find_default_mnist_dir, load_digits_images, load_digits_labels, load_mnist
from lwcompile.experiments.data import load_mnist_labels
from lwcompile.experiments.models import AUTOENCODER_SIZES, _init_all, deep_autoencoder, sigmoid_xent_sum

# A fixed list of standard-library modules: the LM's corpus (about 1 MB of text, the same on every machine with
# the same Python); each is read with inspect.getsource, so only what the interpreter ships is used.
STDLIB_MODULES = ("argparse", "collections", "dataclasses", "difflib", "enum", "fractions", "functools",
                  "inspect", "ipaddress", "json.decoder", "json.encoder", "logging", "pathlib", "pprint",
                  "random", "shutil", "statistics", "string", "tarfile", "textwrap", "typing", "zipfile")


def stdlib_text(modules: tuple[str, ...] = STDLIB_MODULES) -> str:
    """The concatenated source of ``modules`` (standard-library module names), as ASCII (other bytes dropped).

    >>> t = stdlib_text(("textwrap",)); "def wrap" in t
    True
    """
    import importlib
    parts = [inspect.getsource(importlib.import_module(m)) for m in modules]
    return "\n".join(parts).encode("ascii", "ignore").decode("ascii")


class CharTransformerLM(nn.Module):
    """A causal character-level Transformer LM: token + learned position embedding, ``layers`` pre-norm
    ``nn.TransformerEncoderLayer``s under a causal mask, a final LayerNorm and an output head tied to the token
    embedding. Returns logits (batch, seq, vocab).

    >>> m = CharTransformerLM(vocab=20, seq=8, d=16, layers=1, heads=2)
    >>> tuple(m(torch.zeros(3, 8, dtype=torch.long)).shape)
    (3, 8, 20)
    """

    def __init__(self, vocab: int, seq: int = 64, d: int = 64, layers: int = 2, heads: int = 4, seed: int = 0):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, seq, d))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, dim_feedforward=4 * d, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.register_buffer("mask", torch.triu(torch.full((seq, seq), float("-inf")), diagonal=1), persistent=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.emb.weight.normal_(0.0, 0.02, generator=g)
            self.pos.normal_(0.0, 0.02, generator=g)
            for name, p in self.layers.named_parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.02, generator=g)
                elif "norm" not in name:
                    p.zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens) + self.pos
        for layer in self.layers:
            h = layer(h, src_mask=self.mask)
        return self.head(self.norm(h))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-character cross-entropy (nats) over every position of every sequence.

    >>> round(float(lm_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))), 4)  # log 4
    1.3863
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def mnist_cnn(seed: int = 0) -> nn.Sequential:
    """2 conv + 2 linear layers with ReLU and max-pooling, for flattened 28×28 MNIST rows (N × 784); logits.

    >>> tuple(mnist_cnn()(torch.zeros(2, 784)).shape)
    (2, 10)
    """
    model = nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # 28 -> 14
        nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # 14 -> 7
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))
    return _init_all(model, seed)


def mnist_mlp(seed: int = 0, sizes: tuple[int, ...] = (784, 512, 512, 10)) -> nn.Sequential:
    """The MNIST MLP classifier 784-512-512-10 with ReLU; logits.

    >>> tuple(mnist_mlp()(torch.zeros(2, 784)).shape)
    (2, 10)
    """
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return _init_all(nn.Sequential(*layers), seed)


@dataclass
class LoadedWorkload:
    """A workload with its data in memory: ``build(seed)`` a fresh model, ``batch(k)`` the k-th training batch
    (the same for every method: one fixed shuffle per epoch from the workload's seed), ``eval_loss(model)`` the
    mean task loss on a fixed subset of the training data (what the targets are measured on)."""

    name: str
    data: str  # which data set was loaded ("mnist", "digits", "stdlib")
    build: Callable[..., nn.Module]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    batch_size: int
    targets: tuple[float, ...]
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    seed: int = 0
    _perm: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def steps_per_epoch(self) -> int:
        return self.x.shape[0] // self.batch_size

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i = divmod(k, self.steps_per_epoch)
        if epoch not in self._perm:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm[epoch] = torch.randperm(self.x.shape[0], generator=g)
        idx = self._perm[epoch][i * self.batch_size:(i + 1) * self.batch_size]
        return self.x[idx], self.y[idx]

    @torch.no_grad()
    def eval_loss(self, model: nn.Module, chunk: int = 2000) -> float:
        total = 0.0
        for i in range(0, self.eval_x.shape[0], chunk):
            xb, yb = self.eval_x[i:i + chunk], self.eval_y[i:i + chunk]
            total += float(self.loss_fn(model(xb), yb)) * xb.shape[0]
        return total / self.eval_x.shape[0]


def _mnist(data_dir: str | Path | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    d = find_default_mnist_dir() if str(data_dir) == "auto" else (None if data_dir in (None, "digits") else data_dir)
    if d is None:
        return load_digits_images("train"), load_digits_labels("train"), "digits"
    return load_mnist(d, "train"), load_mnist_labels(d, "train"), "mnist"


def _subset(x: torch.Tensor, y: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 7)
    idx = torch.randperm(x.shape[0], generator=g)[:n]
    return x[idx], y[idx]


@dataclass(frozen=True)
class Workload:
    """One row of :data:`WORKLOADS`: ``load(data_dir)`` reads its data and returns a :class:`LoadedWorkload`."""

    name: str
    description: str
    targets: tuple[float, ...]  # train-loss targets, loosest first
    batch_size: int
    loader: Callable[[str | Path | None, int], LoadedWorkload]

    def load(self, data_dir: str | Path | None = "auto", seed: int = 0) -> LoadedWorkload:
        return self.loader(data_dir, seed)


def _load_autoencoder(data_dir, seed: int) -> LoadedWorkload:
    x, _, name = _mnist(data_dir)
    sizes = AUTOENCODER_SIZES if name == "mnist" else (64, 32, 16, 8, 16, 32, 64)
    ex, _ = _subset(x, x, 10_000, seed)
    return LoadedWorkload("autoencoder", name, lambda seed=0: deep_autoencoder(sizes, seed=seed), sigmoid_xent_sum,
                          x, x, 1000 if name == "mnist" else 100, WORKLOADS["autoencoder"].targets, ex, ex, seed)


def _load_classifier(kind: str) -> Callable:
    def load(data_dir, seed: int) -> LoadedWorkload:
        x, y, name = _mnist(data_dir)
        if name == "digits":  # 8×8 rows: pad to 28×28 so the same nets run
            x = F.pad(x.reshape(-1, 8, 8), (10, 10, 10, 10)).reshape(-1, 784)
        ex, ey = _subset(x, y, 10_000, seed)
        build = mnist_cnn if kind == "cnn" else mnist_mlp
        return LoadedWorkload(kind, name, build, F.cross_entropy, x, y, 256, WORKLOADS[kind].targets, ex, ey, seed)
    return load


def _load_lm(data_dir, seed: int, seq: int = 64) -> LoadedWorkload:
    text = stdlib_text()
    vocab = sorted(set(text))
    table = {c: i for i, c in enumerate(vocab)}
    data = torch.tensor([table[c] for c in text], dtype=torch.long)
    n = (data.numel() - 1) // seq
    x = data[:n * seq].reshape(n, seq)
    y = data[1:n * seq + 1].reshape(n, seq)
    ex, ey = _subset(x, y, 512, seed)
    return LoadedWorkload("lm", "stdlib", lambda seed=0: CharTransformerLM(len(vocab), seq=seq, seed=seed), lm_loss,
                          x, y, 32, WORKLOADS["lm"].targets, ex, ey, seed)


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("autoencoder", "the paper's MNIST deep autoencoder 784-1000-500-250-30-250-500-1000-784, tanh, "
             "sigmoid cross-entropy summed over pixels", (150.0, 100.0, 80.0), 1000, _load_autoencoder),
    Workload("cnn", "MNIST CNN: conv5x5(16)-pool-conv5x5(32)-pool-linear(128)-linear(10), ReLU, cross-entropy",
             (0.3, 0.15, 0.1), 256, _load_classifier("cnn")),
    Workload("mlp", "MNIST MLP 784-512-512-10, ReLU, cross-entropy", (0.2, 0.1, 0.04), 256, _load_classifier("mlp")),
    Workload("lm", "char-level causal Transformer LM: 2 pre-norm layers, d 64, 4 heads, tied embedding, seq 64, "
             "on Python standard-library sources", (2.6, 2.3, 2.1), 32, _load_lm),
)}
