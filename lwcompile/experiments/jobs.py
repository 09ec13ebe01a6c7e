"""Training factories for ``lwcompile train``: each returns an :class:`lwcompile.TrainJob`.

    lwcompile train lwcompile.experiments.jobs:mnist_autoencoder            # one MNIST epoch, ~3 min on 2 cores
    lwcompile train lwcompile.experiments.jobs:mnist_autoencoder --epochs 5 --arg schedule=paper
    lwcompile train lwcompile.experiments.jobs:digits_classifier --epochs 5  # about half a minute

``mnist_autoencoder`` is the paper's deep autoencoder (784-1000-500-250-30-250-500-1000-784, tanh, sigmoid output,
sigmoid cross-entropy summed over pixels) with LocoProp-M's inner optimizer (TF1 RMSProp, momentum 0.999, decay
0.9, ε 1e-5, inner step decay lr·max(1 − k/T, 0.25), γ = 10, T = 10) at a constant inner lr 1e-5 by default: the
paper's schedule (``schedule="paper"``, as ``examples/autoencoder.py`` runs it) warms the inner lr up from 0 over 5
epochs, so its first epoch is flat. Without MNIST it trains the same shape of net on scikit-learn's 8x8 digits.

Example:
    >>> job = digits_classifier(hidden=16)
    >>> type(job).__name__, job.batch_size, tuple(job.train_data[0].shape)
    ('TrainJob', 64, (1437, 64))
    >>> paper = mnist_autoencoder("digits", schedule="paper")  # 14 steps of 100 digits per epoch
    >>> paper.config.inner_lr_warmup_steps, paper.config.inner_lr_schedule_every
    (70, 14)
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lwcompile
from lwcompile.experiments.data import load_digits_images, load_digits_labels, load_images
from lwcompile.experiments.models import AUTOENCODER_SIZES, bce_sum, deep_autoencoder, mlp, reference_schedule

DIGITS_AUTOENCODER_SIZES = (64, 32, 16, 8, 16, 32, 64)


def mnist_autoencoder(data_dir: str | Path = "auto", batch_size: int | None = None, inner_lr: float = 1e-5,
                      schedule: str = "constant", seed: int = 0) -> lwcompile.TrainJob:
    """The paper's MNIST deep autoencoder with LocoProp-M; evaluates the test-set loss.

    ``data_dir``: a directory of MNIST idx files, "auto" (``../shared/data/mnist`` beside the repository if there,
    else scikit-learn's digits) or "digits". ``batch_size`` defaults to 1000 (MNIST) / 100 (digits). ``schedule``:
    "constant" (the inner lr throughout) or "paper" (the official per-epoch warm-up and decay,
    :func:`~lwcompile.experiments.models.reference_schedule`).
    """
    if schedule not in ("constant", "paper"):
        raise lwcompile.ConfigError(f"schedule={schedule!r}: must be 'constant' or 'paper'.")
    arg = None if str(data_dir) in ("digits", "none", "") else data_dir
    x_train, name = load_images(arg, "train")
    x_test, _ = load_images(arg, "test")
    sizes = AUTOENCODER_SIZES if name == "mnist" else DIGITS_AUTOENCODER_SIZES
    batch_size = batch_size or (1000 if name == "mnist" else 100)
    config = lwcompile.Config(target="md_post", local_loss="matching", gamma=10.0, steps=10,
                              inner_optimizer="rmsprop_tf1", inner_lr=inner_lr, momentum=0.999, decay=0.9, eps=1e-5,
                              inner_lr_decay=True)
    if schedule == "paper":
        config = config.replace(**reference_schedule(x_train.shape[0] // batch_size))
    return lwcompile.TrainJob(deep_autoencoder(sizes, seed=seed, output_sigmoid=True), bce_sum, (x_train, x_train),
                              batch_size=batch_size,
                              eval_data=(x_test, x_test), config=config, seed=seed)


def digits_classifier(hidden: int = 64, batch_size: int = 64, inner_lr: float = 1e-3,
                      seed: int = 0) -> lwcompile.TrainJob:
    """A 64-``hidden``-10 ReLU MLP on scikit-learn's 8x8 digits, cross-entropy, LocoProp-M with an Adam inner
    optimizer; evaluates the test loss and accuracy (column ``eval_accuracy``)."""
    x_train, y_train = load_digits_images("train"), load_digits_labels("train")
    x_test, y_test = load_digits_images("test"), load_digits_labels("test")
    model = mlp([64, hidden, 10], act="relu", seed=seed)

    @torch.no_grad()
    def accuracy(m: nn.Module) -> dict[str, float]:
        return {"accuracy": float((m(x_test).argmax(1) == y_test).double().mean())}

    config = lwcompile.Config(inner_optimizer="adam", inner_lr=inner_lr, steps=5)
    return lwcompile.TrainJob(model, F.cross_entropy, (x_train, y_train), batch_size=batch_size,
                              eval_data=(x_test, y_test), eval_fn=accuracy, config=config, seed=seed)
