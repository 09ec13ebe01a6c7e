"""Models and the task loss of the reference experiment, plus two small models for tests and examples.

All builders take a `seed` and initialise with a private generator, so the same seed gives the same
weights regardless of the global RNG state.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

AUTOENCODER_SIZES = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)

_ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


def _glorot_(layer: nn.Linear | nn.Conv2d, g: torch.Generator) -> None:
    """Glorot-uniform weights, zero biases: U(-a, a), a = sqrt(6 / (fan_in + fan_out))."""
    w = layer.weight
    receptive = w[0][0].numel() if w.dim() > 2 else 1  # kernel area for convs
    fan_in, fan_out = w.shape[1] * receptive, w.shape[0] * receptive
    a = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        w.copy_(torch.rand(w.shape, generator=g) * (2 * a) - a)
        if layer.bias is not None:
            layer.bias.zero_()


def _init_all(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            _glorot_(m, g)
    return model


def deep_autoencoder(sizes: Sequence[int] = AUTOENCODER_SIZES, seed: int = 0) -> nn.Sequential:
    """The paper's MNIST autoencoder: Linear layers, tanh after each hidden one except the bottleneck.

    The smallest hidden layer (the 30-unit code) is linear; the output is linear logits, the sigmoid
    being folded into `sigmoid_xent_sum`. Glorot-uniform weights, zero biases.

    >>> m = deep_autoencoder((8, 6, 2, 6, 8))
    >>> m(torch.zeros(3, 8)).shape
    torch.Size([3, 8])
    >>> [type(x).__name__ for x in m]
    ['Linear', 'Tanh', 'Linear', 'Linear', 'Tanh', 'Linear']
    """
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least an input and an output size, got {sizes}")
    bottleneck = min(range(1, len(sizes) - 1), key=lambda i: sizes[i], default=None)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        out_idx = i + 1
        if out_idx < len(sizes) - 1 and out_idx != bottleneck:
            layers.append(nn.Tanh())
    return _init_all(nn.Sequential(*layers), seed)


def sigmoid_xent_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sigmoid cross-entropy summed over pixels (all dims but the first), averaged over the batch.

    >>> round(float(sigmoid_xent_sum(torch.zeros(2, 3), torch.ones(2, 3))), 4)  # 3 * log 2
    2.0794
    """
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / logits.shape[0]


def mlp(sizes: Sequence[int], act: str = "relu", seed: int = 0) -> nn.Sequential:
    """A plain MLP: Linear layers with `act` between them (none after the last). Glorot init.

    >>> mlp([4, 5, 3], act="tanh")(torch.zeros(2, 4)).shape
    torch.Size([2, 3])
    """
    if act not in _ACTS:
        raise ValueError(f"act must be one of {sorted(_ACTS)}, got {act!r}")
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least an input and an output size, got {sizes}")
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(_ACTS[act]())
    return _init_all(nn.Sequential(*layers), seed)


def small_cnn(num_classes: int = 10, seed: int = 0) -> nn.Sequential:
    """A tiny CNN for flattened 8x8 digits (N x 64): conv-relu-pool-linear, returns logits.

    >>> small_cnn()(torch.zeros(5, 64)).shape
    torch.Size([5, 10])
    """
    model = nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),  # accept the flattened rows load_digits_images returns
        nn.Conv2d(1, 8, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, num_classes),
    )
    return _init_all(model, seed)
