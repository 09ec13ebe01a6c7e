"""Plain-backprop baselines for the reference experiment (the MNIST deep autoencoder).

Trains the autoencoder with torch.optim SGD+momentum, Adam and RMSProp over a small learning-rate grid
each; every run starts from the same init (seed) and sees the same data order, so the runs differ only
in the optimizer. Results are plain dicts (JSON-friendly) so LocoProp runs can be compared against them.

    python benchmarks/backprop_baselines.py --quick                 # digits, seconds
    python benchmarks/backprop_baselines.py --data-dir auto --epochs 10

>>> r = train_backprop("adam", 1e-3, torch.rand(64, 8), torch.rand(32, 8), sizes=(8, 4, 8), epochs=1, batch_size=16)
>>> len(r["full_train_loss"]), len(r["step_times"])
(2, 4)
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Any, Sequence

import torch

from lwcompile.experiments.data import batches, load_images
from lwcompile.experiments.models import (backprop_optimizer, AUTOENCODER_SIZES, deep_autoencoder,
                                          full_loss, sigmoid_xent_sum)

# Grids around the usual good values for a loss summed over 784 pixels (gradients ~100x a mean loss,
# hence the small SGD rates).
LR_GRID: dict[str, tuple[float, ...]] = {
    "sgd": (1e-4, 3e-4, 1e-3),
    "adam": (1e-4, 3e-4, 1e-3),
    "rmsprop": (3e-5, 1e-4, 3e-4),
}
QUICK_LR_GRID: dict[str, tuple[float, ...]] = {"sgd": (1e-3,), "adam": (1e-3,), "rmsprop": (3e-4,)}
DIGITS_SIZES = (64, 32, 16, 8, 16, 32, 64)  # same shape of net, scaled to 8x8 inputs





def train_backprop(
    opt_name: str,
    lr: float,
    x_train: torch.Tensor,
    x_test: torch.Tensor,
    sizes: Sequence[int] = AUTOENCODER_SIZES,
    epochs: int = 10,
    batch_size: int = 1000,
    seed: int = 0,
    max_steps_per_epoch: int | None = None,
) -> dict[str, Any]:
    """Train the autoencoder with plain backprop; return the curves as a plain dict.

    Keys: optimizer, lr, epoch_mean_train_loss (mean over the epoch's batches, one per epoch),
    full_train_loss and test_loss (whole sets, index 0 = at init, then after each epoch),
    step_times (seconds per optimizer step), diverged (a non-finite loss stopped the run).
    """
    model = deep_autoencoder(sizes, seed=seed)
    opt = backprop_optimizer(opt_name, model.parameters(), lr)
    out: dict[str, Any] = {
        "optimizer": opt_name, "lr": lr, "epoch_mean_train_loss": [],
        "full_train_loss": [full_loss(model, x_train)], "test_loss": [full_loss(model, x_test)],
        "step_times": [], "diverged": False,
    }
    for epoch in range(epochs):
        losses = []
        for step, xb in enumerate(batches(x_train, batch_size, epoch=epoch, seed=seed)):
            if max_steps_per_epoch is not None and step >= max_steps_per_epoch:
                break
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = sigmoid_xent_sum(model(xb), xb)
            loss.backward()
            opt.step()
            out["step_times"].append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                out["diverged"] = True
                break
        out["epoch_mean_train_loss"].append(sum(losses) / max(len(losses), 1))
        if out["diverged"]:
            break
        out["full_train_loss"].append(full_loss(model, x_train))
        out["test_loss"].append(full_loss(model, x_test))
    return out


def run_grid(
    x_train: torch.Tensor,
    x_test: torch.Tensor,
    sizes: Sequence[int] = AUTOENCODER_SIZES,
    grid: dict[str, Sequence[float]] = LR_GRID,
    **kw: Any,
) -> list[dict[str, Any]]:
    """`train_backprop` for every (optimizer, lr) in `grid`, same seed and data order for all."""
    return [train_backprop(name, lr, x_train, x_test, sizes, **kw) for name, lrs in grid.items() for lr in lrs]


def time_step(
    sizes: Sequence[int] = AUTOENCODER_SIZES, batch_size: int = 1000, n: int = 20, warmup: int = 3,
    opt_name: str = "adam",
) -> dict[str, float]:
    """Median/mean seconds of one backprop step (forward, backward, update) on random [0,1] data.

    >>> t = time_step((8, 4, 8), batch_size=4, n=2, warmup=1); t["median_s"] > 0
    True
    """
    model = deep_autoencoder(sizes, seed=0)
    opt = backprop_optimizer(opt_name, model.parameters(), 1e-4)
    xb = torch.rand(batch_size, sizes[0], generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        sigmoid_xent_sum(model(xb), xb).backward()
        opt.step()
        if i >= warmup:  # the first steps allocate optimizer state and warm caches
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_s": times[len(times) // 2], "mean_s": sum(times) / len(times), "n": n,
            "batch_size": batch_size, "threads": torch.get_num_threads()}


def format_table(results: list[dict[str, Any]]) -> str:
    """One line per run: final epoch-mean/full train loss, test loss, median step time."""
    head = f"{'optimizer':<9} {'lr':>8} {'init':>8} {'ep-mean':>9} {'train':>9} {'test':>9} {'best test':>9} {'step ms':>8}"
    lines = [head, "-" * len(head)]
    for r in results:
        st = sorted(r["step_times"]) or [float("nan")]
        tag = " DIVERGED" if r["diverged"] else ""
        lines.append(
            f"{r['optimizer']:<9} {r['lr']:>8.0e} {r['full_train_loss'][0]:>8.2f} "
            f"{r['epoch_mean_train_loss'][-1]:>9.2f} {r['full_train_loss'][-1]:>9.2f} {r['test_loss'][-1]:>9.2f} "
            f"{min(r['test_loss']):>9.2f} {1000 * st[len(st) // 2]:>8.1f}{tag}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None,
                   help="directory with MNIST idx files, or 'auto' for ../shared/data/mnist; default: sklearn digits")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=None, help="default 1000 (MNIST) / 100 (digits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 epoch, a few steps, one lr per optimizer, MNIST sliced to 5000 images")
    p.add_argument("--time-step", action="store_true", help="also time one full-size MNIST-autoencoder step")
    a = p.parse_args(argv)

    x_train, name = load_images(a.data_dir, "train")
    x_test, _ = load_images(a.data_dir, "test")
    sizes = AUTOENCODER_SIZES if name == "mnist" else DIGITS_SIZES
    batch_size = a.batch_size or (1000 if name == "mnist" else 100)
    grid, epochs, max_steps = LR_GRID, a.epochs, None
    if a.quick:
        grid, epochs, max_steps = QUICK_LR_GRID, 1, 5
        x_train, x_test = x_train[:5000], x_test[:1000]
    print(f"data={name} train={tuple(x_train.shape)} test={tuple(x_test.shape)} sizes={sizes} "
          f"batch={batch_size} epochs={epochs} threads={torch.get_num_threads()}")
    results = run_grid(x_train, x_test, sizes, grid, epochs=epochs, batch_size=batch_size,
                       seed=a.seed, max_steps_per_epoch=max_steps)
    print(format_table(results))
    if a.time_step:
        t = time_step(AUTOENCODER_SIZES, batch_size=1000)
        print(f"MNIST autoencoder backprop step, batch 1000: median {t['median_s']:.3f}s mean {t['mean_s']:.3f}s "
              f"over {t['n']} steps ({t['threads']} threads)")
    return results


if __name__ == "__main__":
    main()
