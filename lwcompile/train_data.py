"""Batches for ``lwcompile train`` in an order a checkpoint can reproduce, and the evaluation of a model on them.

Two forms of data, one interface (:class:`Batches`):

- ``(inputs, labels)`` tensors (or tuples of tensors, examples along dimension 0): cut into ``batch_size`` rows in a
  permutation drawn from a private generator seeded by ``(seed, epoch)``; the last partial batch is dropped. Starting
  at batch k of an epoch is a slice, so resuming costs nothing.
- a re-iterable with a ``len()`` (a ``DataLoader``, a list of ``(inputs, labels)`` batches): its order comes from
  the global RNGs and any ``torch.Generator`` the loader or its sampler holds, so :meth:`Batches.rng_state` records
  all of them; resuming at batch k restores the epoch's starting state, iterates again and skips k batches.

Example:
    >>> import torch
    >>> data = make_batches((torch.arange(10.).unsqueeze(1), torch.arange(10)), batch_size=4, seed=0)
    >>> len(data), [tuple(x[0].shape) for x, y in data.iterate(epoch=0)]  # (inputs tuple, labels tuple)
    (2, [(4, 1), (4, 1)])
    >>> later = [y[0].tolist() for x, y in data.iterate(epoch=0, start=1)]
    >>> later == [y[0].tolist() for x, y in data.iterate(epoch=0)][1:]
    True
"""
from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from lwcompile.errors import ConfigError
from lwcompile.ir import as_tuple


class Batches:
    """``(inputs, labels)`` batches, epoch by epoch, reproducibly (see the module docstring)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def iterate(self, epoch: int, start: int = 0) -> Iterator[tuple[tuple, tuple]]:
        """The batches of ``epoch`` from position ``start`` on, each as (input tuple, label tuple). The order is
        fixed when this is called (not at the first ``next``)."""
        raise NotImplementedError

    def example(self) -> tuple[tuple, tuple]:
        """One batch to compile with."""
        return next(iter(self.iterate(0)))

    def generators(self) -> dict[str, torch.Generator]:
        """The ``torch.Generator`` objects the data order draws from besides the global RNGs."""
        return {}

    def rng_state(self) -> dict[str, Any]:
        """Every RNG state the data order and the training step may draw from, as tensors and plain values."""
        np_state = np.random.get_state()
        return {"torch": torch.get_rng_state(), "python": random.getstate(),
                "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
                "generators": {k: g.get_state() for k, g in self.generators().items()}}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(_tuples(state["python"]))
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        for key, g in self.generators().items():
            g.set_state(state["generators"][key])


def _tuples(value: Any) -> Any:
    """random.setstate wants tuples where a serializer may have made lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class TensorBatches(Batches):
    def __init__(self, inputs: tuple[torch.Tensor, ...], labels: tuple[torch.Tensor, ...], batch_size: int,
                 seed: int) -> None:
        self.inputs, self.labels, self.batch_size, self.seed = inputs, labels, batch_size, seed
        self.n = inputs[0].shape[0]

    def __len__(self) -> int:
        return self.n // self.batch_size

    def iterate(self, epoch: int, start: int = 0) -> Iterator[tuple[tuple, tuple]]:
        # A private generator seeded from (seed, epoch): the order depends on nothing a run did before.
        g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(epoch))
        perm = torch.randperm(self.n, generator=g)
        rows = (perm[i * self.batch_size:(i + 1) * self.batch_size] for i in range(start, len(self)))
        return ((tuple(t[r] for t in self.inputs), tuple(t[r] for t in self.labels)) for r in rows)

    def example(self) -> tuple[tuple, tuple]:
        return tuple(t[:self.batch_size] for t in self.inputs), tuple(t[:self.batch_size] for t in self.labels)

    def in_order(self) -> Iterator[tuple[tuple, tuple]]:
        """Every example once, in order, in batches (the last one may be partial): for evaluation."""
        for i in range(0, self.n, self.batch_size):
            rows = slice(i, i + self.batch_size)
            yield tuple(t[rows] for t in self.inputs), tuple(t[rows] for t in self.labels)


class IterableBatches(Batches):
    def __init__(self, data: Any, what: str) -> None:
        self.data, self.what = data, what

    def __len__(self) -> int:
        return len(self.data)

    def generators(self) -> dict[str, torch.Generator]:
        found = {}
        for key, owner in (("loader", self.data), ("sampler", getattr(self.data, "sampler", None)),
                           ("batch_sampler", getattr(getattr(self.data, "batch_sampler", None), "sampler", None))):
            g = getattr(owner, "generator", None)
            if isinstance(g, torch.Generator) and all(g is not other for other in found.values()):
                found[key] = g
        return found

    def iterate(self, epoch: int, start: int = 0) -> Iterator[tuple[tuple, tuple]]:
        it = iter(self.data)  # now, not at the first next(): the loader draws its order from the RNGs as they are
        for _ in itertools.islice(it, start):
            pass
        return (self._check(i, batch) for i, batch in enumerate(it, start))

    def _check(self, i: int, batch: Any) -> tuple[tuple, tuple]:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ConfigError(f"batch {i} of {self.what} is a {type(batch).__name__}; each batch must be an "
                              "(inputs, labels) pair (inputs and labels each a tensor or a tuple of tensors).")
        return as_tuple(batch[0]), as_tuple(batch[1])

    def in_order(self) -> Iterator[tuple[tuple, tuple]]:
        return self.iterate(0)


def make_batches(data: Any, batch_size: int | None, seed: int = 0, what: str = "data") -> Batches:
    """The :class:`Batches` of a TrainJob's ``train_data`` / ``eval_data`` (``what`` names it in errors)."""
    if isinstance(data, tuple) and len(data) == 2 and all(_tensors(part) for part in data):
        inputs, labels = as_tuple(data[0]), as_tuple(data[1])
        sizes = {t.shape[0] if t.dim() else None for t in inputs + labels}
        if len(sizes) != 1 or None in sizes:
            raise ConfigError(f"{what}: every input and label tensor needs the same number of examples along "
                              f"dimension 0, got shapes {[tuple(t.shape) for t in inputs + labels]}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"{what} is (inputs, labels) tensors, so TrainJob.batch_size must be an int >= 1, got "
                              f"{batch_size!r}.")
        return TensorBatches(inputs, labels, batch_size, seed)
    if hasattr(data, "__next__"):
        raise ConfigError(f"{what} is an iterator, which one epoch would use up; pass a re-iterable (a DataLoader, "
                          "a list of batches) so every epoch, and a resumed run, can iterate it again.")
    if not hasattr(data, "__iter__") or not hasattr(data, "__len__"):
        raise ConfigError(f"{what} is a {type(data).__name__}; pass (inputs, labels) tensors, or a re-iterable with "
                          "a len() (a torch.utils.data.DataLoader, a list of (inputs, labels) batches).")
    return IterableBatches(data, what)


def _tensors(part: Any) -> bool:
    return isinstance(part, torch.Tensor) or (isinstance(part, tuple) and bool(part)
                                              and all(isinstance(t, torch.Tensor) for t in part))


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: Callable, data: Batches | None,
             eval_fn: Callable[[nn.Module], Any] | None) -> dict[str, float]:
    """``eval_loss`` (the example-weighted mean task loss over ``data``, model in eval mode) and ``eval_fn``'s
    metrics. Every module's train/eval flag is put back as it was.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 1); x = torch.randn(10, 2)
        >>> out = evaluate(m, torch.nn.functional.mse_loss, make_batches((x, m(x)), 4, 0, "eval"), None)
        >>> out["eval_loss"] < 1e-12
        True
    """
    modules = [m for m in (model, loss_fn) if isinstance(m, nn.Module)]
    flags = [(sub, sub.training) for m in modules for sub in m.modules()]
    try:
        for m in modules:
            m.eval()
        out: dict[str, float] = {}
        if data is not None:
            total, count = 0.0, 0
            for x, y in data.in_order():
                n = x[0].shape[0] if x and isinstance(x[0], torch.Tensor) and x[0].dim() else 1
                total += float(loss_fn(model(*x), *y)) * n
                count += n
            out["eval_loss"] = total / count if count else math.nan
        if eval_fn is not None:
            metrics = eval_fn(model)
            if isinstance(metrics, dict):
                out.update({f"eval_{k}" if not str(k).startswith("eval") else str(k): float(v)
                            for k, v in metrics.items()})
            else:
                out["eval"] = float(metrics)
        return out
    finally:
        for sub, flag in flags:
            sub.training = flag
