"""Models and the task loss of the reference experiment, plus two small models for tests and examples.

All builders take a `seed` and initialise with a private generator, so the same seed gives the same
weights regardless of the global RNG state.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lwcompile.outer import make_torch_optimizer

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


def deep_autoencoder(sizes: Sequence[int] = AUTOENCODER_SIZES, seed: int = 0,
                     output_sigmoid: bool = False) -> nn.Sequential:
    """The paper's MNIST autoencoder: Linear layers, tanh after each hidden one except the bottleneck.

    The smallest hidden layer (the 30-unit code) is linear; the output is linear logits, the sigmoid
    being folded into `sigmoid_xent_sum`. Glorot-uniform weights, zero biases.

    With ``output_sigmoid=True`` a final ``nn.Sigmoid`` is appended (outputs are probabilities; pair it with
    `bce_sum`): lwcompile then sees the last block with a sigmoid transfer, as the paper's official code
    treats it (its last layer's matching loss is the sigmoid's), instead of an identity block on logits.
    ``outputs_to_logits(model)`` gives the logits model sharing the same parameters.

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
    if output_sigmoid:
        layers.append(nn.Sigmoid())
    return _init_all(nn.Sequential(*layers), seed)


def outputs_to_logits(model: nn.Sequential) -> nn.Sequential:
    """The same network without a trailing ``nn.Sigmoid`` (shares the parameters): logits for `sigmoid_xent_sum`.

    >>> m = deep_autoencoder((4, 2, 4), output_sigmoid=True)
    >>> torch.allclose(torch.sigmoid(outputs_to_logits(m)(torch.ones(1, 4))), m(torch.ones(1, 4)))
    True
    """
    if len(model) and isinstance(model[-1], nn.Sigmoid):
        return nn.Sequential(*list(model)[:-1])
    return model


def bce_sum(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`sigmoid_xent_sum` for a model that ends in a sigmoid: binary cross-entropy of probabilities, summed
    over pixels, averaged over the batch. (torch clamps its logs at -100, so it is finite at 0 and 1.)

    >>> round(float(bce_sum(torch.full((2, 3), 0.5), torch.ones(2, 3))), 4)  # 3 * log 2
    2.0794
    """
    return F.binary_cross_entropy(probs, target, reduction="sum") / probs.shape[0]


def reference_schedule(steps_per_epoch: int, warmup_epochs: int = 5, num_epochs: int = 100) -> dict[str, Any]:
    """The paper's official learning-rate schedule as :class:`lwcompile.Config` fields, for ``steps_per_epoch``.

    The official LocoProp code multiplies the lr of 0-based epoch e by e / W for e < W (so epoch 0 runs at 0),
    then by 1 − (e + 1 − W) / (N − W), held constant within an epoch (its run: W = 5, N = 100, 99 epochs trained).
    These fields give the same factors bit for bit (:func:`lwcompile.schedule.schedule_factor`).

    >>> import lwcompile
    >>> from lwcompile.schedule import schedule_factor
    >>> cfg = lwcompile.Config(**reference_schedule(steps_per_epoch=3))
    >>> [round(schedule_factor(cfg, 3 * e + 2), 4) for e in (0, 1, 4, 5, 6, 98)]
    [0.0, 0.2, 0.8, 0.9895, 0.9789, 0.0105]
    """
    if steps_per_epoch < 1 or warmup_epochs < 0 or num_epochs <= warmup_epochs:
        raise ValueError(f"need steps_per_epoch >= 1 and 0 <= warmup_epochs < num_epochs, got {steps_per_epoch}, "
                         f"{warmup_epochs}, {num_epochs}")
    return {"inner_lr_warmup_steps": warmup_epochs * steps_per_epoch, "inner_lr_warmup_start": 0.0,
            "inner_lr_anneal": "linear", "inner_lr_anneal_steps": (num_epochs - warmup_epochs) * steps_per_epoch,
            "inner_lr_anneal_end": 0.0, "inner_lr_schedule_every": steps_per_epoch}


def sigmoid_xent_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sigmoid cross-entropy summed over pixels (all dims but the first), averaged over the batch.

    >>> round(float(sigmoid_xent_sum(torch.zeros(2, 3), torch.ones(2, 3))), 4)  # 3 * log 2
    2.0794
    """
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / logits.shape[0]


@torch.no_grad()
def full_loss(logits_model: nn.Module, x: torch.Tensor, chunk: int = 10_000) -> float:
    """Mean per-example task loss (:func:`sigmoid_xent_sum`) of a logits model over all rows of ``x``, in chunks
    to bound memory.

    >>> m = deep_autoencoder((4, 2, 4)); round(full_loss(m, torch.zeros(3, 4)), 4)
    2.7726
    """
    total = 0.0
    for i in range(0, x.shape[0], chunk):
        xb = x[i:i + chunk]
        total += float(sigmoid_xent_sum(logits_model(xb), xb)) * xb.shape[0]
    return total / x.shape[0]


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


def backprop_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """The backprop baselines' torch.optim optimizer by name: "sgd" (momentum 0.9), "adam", "rmsprop" (decay 0.9).

    >>> type(backprop_optimizer("adam", [torch.zeros(1, requires_grad=True)], 1e-3)).__name__
    'Adam'
    """
    # the paper baselines' settings of lwcompile's one torch-optimizer factory
    spec = {"sgd": ("momentum", {}), "adam": ("adam", {}), "rmsprop": ("rmsprop", {"alpha": 0.9})}
    if name not in spec:
        raise ValueError(f"optimizer must be one of 'sgd', 'adam', 'rmsprop', got {name!r}")
    return make_torch_optimizer(spec[name][0], params, lr, spec[name][1])
