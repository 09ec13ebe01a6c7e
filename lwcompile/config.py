"""Configuration of a compiled program. Every field is validated on construction."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

from lwcompile.errors import ConfigError
from lwcompile.passes.local_losses import LOSS_RULES, TARGET_RULES

# Target kinds and local losses are rows of passes/local_losses.py; what Config validates is read from them.
TARGETS = tuple(TARGET_RULES)
LOCAL_LOSSES = tuple(LOSS_RULES)
INNER_OPTIMIZERS = ("gd", "momentum", "rmsprop", "rmsprop_tf1", "adam", "exact")
OUTER_OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "rmsprop", "none")
FRONTENDS = ("auto", "fx", "export")
INNER_LR_ANNEALS = ("none", "linear", "cosine")
RESIDUAL_NORMS = ("none", "output")

# Which activation space each target lives in and each local loss compares in.
TARGET_SPACE = {name: rule.space for name, rule in TARGET_RULES.items()}
LOSS_SPACE = {name: rule.space for name, rule in LOSS_RULES.items()}
# The pairs of METHOD.md, for which T=1 plain GD equals SGD at lr η·γ.
PAIRS = {name: rule.pair for name, rule in TARGET_RULES.items()}

# Optimizer defaults where a field is left None (torch's for the torch-semantics ones; for rmsprop_tf1 the paper's,
# except momentum 0.995 instead of 0.999: with 0.999 the heavy ball on the scaled step made Config() stall on an MNIST
# classifier (docs/results/lm_study/results.md, "Config() momentum"); the paper reproduction sets 0.999 itself).
_INNER_DEFAULTS = {
    "gd": {},
    "momentum": {"momentum": 0.9},
    "rmsprop": {"momentum": 0.0, "decay": 0.99, "eps": 1e-8},
    "rmsprop_tf1": {"momentum": 0.995, "decay": 0.9, "eps": 1e-5},
    "adam": {"betas": (0.9, 0.999), "eps": 1e-8},
    "exact": {},  # a closed-form solve (passes/exact_solver.py): no options, no state; steps and inner_lr unused
}
EXACT_LOSSES = ("squared_pre",)  # local losses quadratic in the weights: what inner_optimizer="exact" can solve


@dataclass(frozen=True)
class Config:
    """How to compile and train. The defaults are LocoProp-M (the mirror-descent target with the matching loss and
    TF1-RMSProp inner steps, as in the paper) with T = 3, γ = 30, inner lr 1e-4 and RMSProp momentum 0.995 instead of
    the paper's T = 10, γ = 10, 1e-5 and 0.999 (0.999 stalls on an MNIST MLP classifier at loss ~0.08;
    docs/results/lm_study/results.md): in docs/performance.md's study this reached the MNIST autoencoder's loss 100 in 0.30× the time of
    the paper's setting as packaged on PyPI (``locoprop``), and on four digits models (MLPs with tanh / ReLU+BatchNorm,
    a sigmoid autoencoder, a small CNN) it ended lower after the same 150 steps at a third of the time. The paper's
    recipe is ``Config(steps=10, gamma=10.0, inner_lr=1e-5, momentum=0.999)`` plus its schedule
    (``lwcompile.experiments.models.reference_schedule``); the official code's inner step decay lr·max(1 − k/T, 0.25)
    is ``inner_lr_decay=True``.

    Fields (every one is checked when the Config is made; a bad value raises :class:`~lwcompile.ConfigError`):

    - ``target`` ("gd_pre" | "dual_md_pre" | "gd_post" | "md_post", default "md_post"): how each block's target is
      made from the task loss's gradient (METHOD.md step 3): a GD step on the pre-activation â − γ∂L/∂â; the
      dual-MD step â − γ∂L/∂ŷ; a GD step on the post-activation ŷ − γ∂L/∂ŷ; or the mirror-descent step
      f(â) − γ∂L/∂â (LocoProp-M).
    - ``local_loss`` ("squared_pre" | "dual_bregman" | "squared_post" | "matching", default "matching"): what each
      block's inner loop minimizes against its target. It must compare activations in the target's space: the
      pairs are gd_pre + squared_pre (LocoProp-S), dual_md_pre + dual_bregman, gd_post + squared_post and
      md_post + matching (LocoProp-M); another pairing is refused.
    - ``gamma`` (float > 0, default 30.0): the activation learning rate γ, how far targets move along the task-loss
      gradient. With ``steps=1`` and ``inner_optimizer="gd"`` a step equals SGD at lr ``inner_lr·gamma``.
    - ``steps`` (int >= 1, default 3): inner iterations T each block's optimizer takes per training step.
    - ``inner_optimizer`` ("gd" | "momentum" | "rmsprop" | "rmsprop_tf1" | "adam" | "exact", default
      "rmsprop_tf1"): the blocks' inner optimizer. "rmsprop" has torch's semantics; "rmsprop_tf1" is TensorFlow 1's
      (mean-square slots start at 1, ε inside the square root, momentum on the scaled step), the paper's. "exact"
      solves a block's local least-squares problem in one Cholesky solve instead of T steps; only with
      ``local_loss="squared_pre"`` (LocoProp-S), and ``prox`` > 0 unless every batch has more rows than the
      weight has inputs (``steps`` and ``inner_lr`` are unused; not exportable to ONNX).
    - ``inner_lr`` (float >= 0, default 1e-4): the inner optimizer's learning rate (0 is allowed: a warm-up).
      ``prog.inner_lr = ...`` changes it between steps; the schedule fields below multiply it.
    - ``prox`` (float >= 0, default 0.0): the proximal weight λ of (λ/2)‖W̃ − W‖², which keeps a block's inner
      iterates near its weights at the start of the step.
    - ``prox_relative`` (bool, default False): with ``inner_optimizer="exact"`` only, read ``prox`` as a multiple
      of each block's mean Gram diagonal tr(XᵀX)/D on the step's batch (X the block's input rows, D its width), so
      one number damps every block alike whatever its input scale and the batch size (λ_block = prox·tr(XᵀX)/D).
    - ``residual_norm`` ("none" | "output", default "none"): with ``inner_optimizer="exact"`` only. "output"
      rescales the exact solve's target residual R = target − â per output (a column of R for a linear block, an
      output channel of a conv) to the block's root-mean-square column norm, ‖R_j‖ → ‖R‖_F/√O, before solving: the
      block's total move is kept, but an output whose loss gradient is tiny (a transformer's query/key projections
      at init, a classifier's rare classes) moves as far as the others, as Adam's per-entry normalization does.
      It is a per-step rescaling, so the step is no longer SGD at T = 1 (docs/results/lm_study/results.md).
    - ``momentum`` (float in [0, 1) or None, default None): momentum of "momentum" (default 0.9), "rmsprop" (0.0)
      and "rmsprop_tf1" (0.995; the paper's is 0.999, which stalls Config() on an MNIST classifier); None takes
      that default. Used only by those three optimizers.
    - ``decay`` (float in [0, 1) or None, default None): the mean-square decay of "rmsprop" (default 0.99) and
      "rmsprop_tf1" (0.9); None takes that default.
    - ``eps`` (float > 0 or None, default None): the denominator's ε of "rmsprop" (default 1e-8), "rmsprop_tf1"
      (1e-5) and "adam" (1e-8); None takes that default.
    - ``betas`` (two floats in [0, 1) or None, default None): Adam's (β1, β2), default (0.9, 0.999).
    - ``inner_lr_decay`` (bool, default False): scale inner iteration k's step by max(1 − k/T, 0.25), as the
      official code does.
    - ``outer_optimizer`` ("sgd" | "momentum" | "adam" | "adamw" | "rmsprop" | "none", default "adam"): the torch
      optimizer for non-block parameters (norm affines, embeddings, biases outside a linear op, recurrent layers,
      tied weights' extra uses); "none" leaves them unchanged.
    - ``outer_lr`` (float >= 0, default 1e-3): the outer optimizer's learning rate.
    - ``outer_options`` (a dict or (name, value) pairs, default ()): more keyword arguments for the outer torch
      optimizer, e.g. ``{"weight_decay": 1e-4}``.
    - ``skip`` (regular expressions, default ()): layers to hand to the outer optimizer instead of making them
      blocks, matched against block names and module class names, e.g. ``(r"^head\\.", "Embedding")``.
    - ``frontend`` ("auto" | "fx" | "export", default "auto"): the tracer. "auto" tries ``torch.fx.symbolic_trace``
      and falls back to ``torch.export`` when it fails or its graph does not reproduce the model.
    - ``check_finite`` (bool, default True): refuse a step whose loss, targets, gradients or new values hold a NaN
      or inf (:class:`~lwcompile.NonFiniteError`, the model unchanged); False skips those checks.
    - ``reuse_preactivation`` (bool, default True): hand each block's inner graph the pre-activation â = op(x; W, b)
      the forward pass already computed, as its first iteration's (or the exact solve's) z, instead of computing
      it again: one fewer matmul per block and step, the same numbers (the same op on the same values). It keeps
      â alive until the block's update (one activation-sized tensor per block). Runs that cannot pass â along (the
      distributed runtime, exported ONNX programs) use the graphs without it.
    - ``compile_inner`` (bool, default False): run each block's inner graph compiled by ``torch.compile`` (inductor,
      once per shape, at its first step), which fuses the optimizer's element-wise updates. Same mathematics,
      float rounding may differ slightly from eager's. A block whose graph fails to compile runs eagerly, warned
      once (:mod:`lwcompile.runtime.compiled`). The first step pays the compile time (seconds per block). Not part
      of a checkpoint's fingerprint: a run may resume with the other value (bit-identical only with the same one).
    - ``fuse`` (bool, default True): run the inner loops of identical blocks (same op, parameter shapes, transfer
      function and input shapes: the projections of every layer of a transformer) as one batched graph over their
      stacked weights, inputs, targets and optimizer state (:mod:`lwcompile.passes.fuse`): one launch per op
      instead of N, for blocks small enough that per-op overhead dominates (at most
      ``passes.fuse.FUSE_MAX_MACS`` multiply-adds each on the example batch; larger ones ran slower batched on a
      CPU). The same arithmetic per block (float rounding may differ: a bmm instead of N mm's). Only
      ``Program.step`` without a runner fuses; the distributed runtimes and ONNX export run every block's own
      graph, and the exact solve is never fused (``prog.fusion.notes`` says which blocks and why). Not part of a
      checkpoint's fingerprint.

    The inner learning rate's schedule over training (positions count ``Program.step`` calls, i.e. the program's
    ``step_count``; not the T inner iterations, which ``inner_lr_decay`` shapes). The next step's inner lr is
    ``prog.inner_lr × factor(step_count)`` (:func:`lwcompile.schedule.schedule_factor`); the factor is computed at
    the first step of each interval of ``inner_lr_schedule_every`` steps and held for the whole interval:

    - ``inner_lr_warmup_steps`` (int >= 0, default 0): steps of linear warm-up. An interval starting at step
      q < warmup runs at ``start + (1 − start)·q/warmup``, so the first one runs at the start fraction.
    - ``inner_lr_warmup_start`` (float in [0, 1], default 0.0): the warm-up's first factor (0: the first interval
      moves no block weight while the optimizer slots fill, as in the paper's official code).
    - ``inner_lr_anneal`` ("none" | "linear" | "cosine", default "none"): the shape of the decay after the warm-up.
      With fraction p = min((q − warmup + every)/anneal_steps, 1) of the annealing done at the interval's end,
      "linear" runs at ``1 − (1 − end)·p`` and "cosine" at ``end + (1 − end)·(1 + cos πp)/2``; so the last
      annealing interval runs at the end fraction, and every later step too.
    - ``inner_lr_anneal_steps`` (int >= 0, default 0; >= 1 when annealing): how many steps the annealing lasts.
    - ``inner_lr_anneal_end`` (float in [0, 1], default 0.0): the factor the annealing ends at.
    - ``inner_lr_schedule_every`` (int >= 1, default 1): steps per interval; steps per epoch gives a per-epoch
      schedule. The paper's (official code: epoch e runs at e/5 for e < 5, then 1 − (e + 1 − 5)/95) is
      ``warmup_steps=5·S, anneal="linear", anneal_steps=95·S, schedule_every=S`` for S steps per epoch,
      bit for bit (``lwcompile.experiments.models.reference_schedule``).

    The defaults are a constant inner lr (factor 1 at every step): a program does not know how long it will be
    trained, every earlier result and the SGD identity assume a constant lr, and TF1-RMSProp's mean-square slots
    start at one, so its first steps are already small (no warm-up is needed to fill them).

    Example:
        >>> import lwcompile
        >>> cfg = lwcompile.Config(target="gd_pre", local_loss="squared_pre", steps=5, inner_optimizer="adam")
        >>> cfg.optimizer_options()["betas"]
        (0.9, 0.999)
        >>> lwcompile.Config(target="bogus")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        lwcompile.errors.ConfigError: Config.target='bogus' ...
    """

    target: str = "md_post"
    local_loss: str = "matching"
    gamma: float = 30.0
    steps: int = 3
    inner_optimizer: str = "rmsprop_tf1"
    inner_lr: float = 1e-4
    prox: float = 0.0
    prox_relative: bool = False
    residual_norm: str = "none"
    momentum: float | None = None
    decay: float | None = None
    eps: float | None = None
    betas: tuple[float, float] | None = None
    inner_lr_decay: bool = False
    outer_optimizer: str = "adam"
    outer_lr: float = 1e-3
    outer_options: tuple[tuple[str, Any], ...] = ()
    skip: tuple[str, ...] = ()
    frontend: str = "auto"
    check_finite: bool = True
    reuse_preactivation: bool = True
    compile_inner: bool = False
    fuse: bool = True
    inner_lr_warmup_steps: int = 0
    inner_lr_warmup_start: float = 0.0
    inner_lr_anneal: str = "none"
    inner_lr_anneal_steps: int = 0
    inner_lr_anneal_end: float = 0.0
    inner_lr_schedule_every: int = 1

    def __post_init__(self) -> None:
        _choice("target", self.target, TARGETS)
        _choice("local_loss", self.local_loss, LOCAL_LOSSES)
        _choice("inner_optimizer", self.inner_optimizer, INNER_OPTIMIZERS)
        _choice("outer_optimizer", self.outer_optimizer, OUTER_OPTIMIZERS)
        _choice("frontend", self.frontend, FRONTENDS)
        if TARGET_SPACE[self.target] != LOSS_SPACE[self.local_loss]:
            raise ConfigError(
                f"Config.target={self.target!r} gives {TARGET_SPACE[self.target]}-activation targets but "
                f"Config.local_loss={self.local_loss!r} compares {LOSS_SPACE[self.local_loss]}-activations; "
                f"use the METHOD.md pair local_loss={PAIRS[self.target]!r}."
            )
        if self.inner_optimizer == "exact" and self.local_loss not in EXACT_LOSSES:
            raise ConfigError(
                f"Config.inner_optimizer='exact' solves a quadratic local loss ({', '.join(EXACT_LOSSES)}) in closed "
                f"form; Config.local_loss={self.local_loss!r} is not quadratic in the weights. Use "
                "target='gd_pre', local_loss='squared_pre' (LocoProp-S), or an iterative inner optimizer.")
        _positive("gamma", self.gamma)
        _positive("inner_lr", self.inner_lr, allow_zero=True)  # 0 is legitimate: a warm-up phase
        _positive("outer_lr", self.outer_lr, allow_zero=True)
        _positive("prox", self.prox, allow_zero=True)
        if not isinstance(self.prox_relative, bool):
            raise ConfigError(f"Config.prox_relative={self.prox_relative!r}: must be True or False.")
        if self.prox_relative and self.inner_optimizer != "exact":
            raise ConfigError("Config.prox_relative=True scales the exact solve's damping by each block's Gram "
                              f"matrix; inner_optimizer={self.inner_optimizer!r} has no Gram matrix: use "
                              "inner_optimizer='exact' or prox_relative=False.")
        _choice("residual_norm", self.residual_norm, RESIDUAL_NORMS)
        if self.residual_norm != "none" and self.inner_optimizer != "exact":
            raise ConfigError(f"Config.residual_norm={self.residual_norm!r} rescales the exact solve's residual; "
                              f"inner_optimizer={self.inner_optimizer!r} does not solve for it: use "
                              "inner_optimizer='exact' or residual_norm='none'.")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"Config.steps={self.steps!r}: the number of inner iterations T must be an int >= 1.")
        for name in ("momentum", "decay"):
            v = getattr(self, name)
            if v is not None and not (_real(v) and 0.0 <= v < 1.0 + (name == "momentum") * 0.0):
                raise ConfigError(f"Config.{name}={v!r}: must be a number in [0, 1).")
        if self.eps is not None:
            _positive("eps", self.eps)
        if self.betas is not None:
            b = tuple(self.betas)
            if len(b) != 2 or not all(_real(x) and 0.0 <= x < 1.0 for x in b):
                raise ConfigError(f"Config.betas={self.betas!r}: must be two numbers in [0, 1).")
            object.__setattr__(self, "betas", (float(b[0]), float(b[1])))
        if isinstance(self.skip, str):
            object.__setattr__(self, "skip", (self.skip,))
        object.__setattr__(self, "skip", tuple(self.skip))
        for pattern in self.skip:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise ConfigError(f"Config.skip entry {pattern!r} is not a valid regular expression ({e}); skip "
                                  "takes regexes matched against block names and module class names, e.g. "
                                  r"skip=(r'^head\.', 'Embedding').") from e
        if isinstance(self.outer_options, dict):
            object.__setattr__(self, "outer_options", tuple(sorted(self.outer_options.items())))
        if not isinstance(self.reuse_preactivation, bool):
            raise ConfigError(f"Config.reuse_preactivation={self.reuse_preactivation!r}: must be True or False.")
        if not isinstance(self.compile_inner, bool):
            raise ConfigError(f"Config.compile_inner={self.compile_inner!r}: must be True or False.")
        if not isinstance(self.fuse, bool):
            raise ConfigError(f"Config.fuse={self.fuse!r}: must be True or False.")
        _check_schedule(self)

    def optimizer_options(self) -> dict[str, Any]:
        """The inner optimizer's options with its defaults filled in."""
        opts = dict(_INNER_DEFAULTS[self.inner_optimizer])
        for key in opts:
            if getattr(self, key) is not None:
                opts[key] = getattr(self, key)
        return opts

    def replace(self, **changes: Any) -> "Config":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


def _check_schedule(c: Config) -> None:
    """The inner-lr schedule fields (see Config's docstring and :mod:`lwcompile.schedule`)."""
    for name, low in (("inner_lr_warmup_steps", 0), ("inner_lr_anneal_steps", 0), ("inner_lr_schedule_every", 1)):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"Config.{name}={v!r}: must be an int >= {low} (a count of training steps, i.e. "
                              "Program.step calls; not inner iterations).")
    for name in ("inner_lr_warmup_start", "inner_lr_anneal_end"):
        v = getattr(c, name)
        if not (_real(v) and 0.0 <= v <= 1.0):
            raise ConfigError(f"Config.{name}={v!r}: must be a fraction of inner_lr in [0, 1].")
    _choice("inner_lr_anneal", c.inner_lr_anneal, INNER_LR_ANNEALS)
    if c.inner_lr_anneal != "none" and c.inner_lr_anneal_steps < 1:
        raise ConfigError(f"Config.inner_lr_anneal={c.inner_lr_anneal!r} needs inner_lr_anneal_steps >= 1 (how many "
                          "training steps the annealing lasts), got 0.")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"Config.{name}={value!r} is not one of {', '.join(map(repr, allowed))}.")


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(name: str, v: Any, allow_zero: bool = False) -> None:
    if not _real(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"Config.{name}={v!r}: must be a finite number {bound}.")
