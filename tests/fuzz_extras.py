"""The adversarial forms of the generated architectures (test fixtures, not API; used by fuzz_models.py).

* **Hooks**: forward hooks and forward pre-hooks that change values, on a layer's linear module, its activation
  module, the layer itself and the root (:func:`register_hooks`). A hook is a string ``"KIND:FN"``: KIND one of
  :data:`HOOK_KINDS` (``fwd``, ``fwd_kw`` (with_kwargs), ``fwd_always`` (always_call), ``fwd_prepend``, ``pre``,
  ``pre_kw``), FN one of :data:`HOOK_FNS`. The hooks are module-level functions (through functools.partial), so the
  oracle's ``copy.deepcopy`` keeps them and eager PyTorch runs them exactly as the user's model would.
* **Parametrized weights** (:func:`parametrize`): torch.nn.utils.parametrizations.weight_norm / orthogonal /
  spectral_norm (eval, or train: must then be refused), parametrize.register_parametrization with a custom module
  (stateless, with a parameter of its own, chained, on the bias), and the old torch.nn.utils.weight_norm.
* **Side branches** (:class:`Side`): h -> h + g or h * sigmoid(g), g a Dense branch of h computed under
  ``torch.no_grad()`` / ``torch.set_grad_enabled(False)``, detached at its output or input, or plain; optionally scaled
  by a parameter of its own first (a parameter whose only path to the loss is detached must not move).
* **Conv1D** (:class:`Conv1D`): HF GPT-2's linear module, ``torch.addmm(bias, x.view(-1, in), W)`` with W (in, out).
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrizations as P
from torch.nn.utils import parametrize as PZ

HOOK_KINDS = ("fwd", "fwd_kw", "fwd_always", "fwd_prepend", "pre", "pre_kw")
# mul_: in place on the output, returns None (forward hooks only); wmean: adds 0.1 * mean of the module's weight (a
# block weight read outside its linear op; linear modules only)
HOOK_FNS = ("scale", "add", "sin", "none", "mul_", "wmean")


def _mul_(t):
    t.mul_(0.5)


_FN = {"scale": lambda t: t * 1.5, "add": lambda t: t + 0.25, "sin": torch.sin, "none": lambda t: None, "mul_": _mul_}


# No Python control flow on the values (torch.fx traces the hooks as they are): hooks are drawn only where the
# tensors are floating point (not on an integer token input).
def _apply(fn: str, mod: nn.Module, t):
    return t + 0.1 * mod.weight.mean() if fn == "wmean" else _FN[fn](t)


def _fwd(fn: str, mod, args, out):
    return _apply(fn, mod, out)


def _fwd_kw(fn: str, mod, args, kwargs, out):
    return _apply(fn, mod, out)


def _pre(fn: str, mod, args):
    new = _apply(fn, mod, args[0])
    # a pre-hook may return a bare value (torch wraps it in a tuple) or a tuple: use both spellings
    return None if new is None else (new if fn == "add" else (new, *args[1:]))


def _pre_kw(fn: str, mod, args, kwargs):
    new = _apply(fn, mod, args[0])
    return None if new is None else ((new, *args[1:]), kwargs)


def register_hooks(module: nn.Module, hooks: tuple) -> None:
    """Register ``hooks`` ("KIND:FN" strings) on ``module``, in order."""
    for h in hooks:
        kind, fn = h.split(":")
        if kind == "pre":
            module.register_forward_pre_hook(functools.partial(_pre, fn))
        elif kind == "pre_kw":
            module.register_forward_pre_hook(functools.partial(_pre_kw, fn), with_kwargs=True)
        elif kind == "fwd_kw":
            module.register_forward_hook(functools.partial(_fwd_kw, fn), with_kwargs=True)
        else:
            module.register_forward_hook(functools.partial(_fwd, fn), prepend=kind == "fwd_prepend",
                                         always_call=kind == "fwd_always")


# ---------------------------------------------------------------- parametrizations
class Smooth(nn.Module):
    """A stateless custom parametrization: W -> 1.5 W + 0.1 tanh(W)."""

    def forward(self, w):
        return 1.5 * w + 0.1 * torch.tanh(w)


class LearnedScale(nn.Module):
    """A custom parametrization with a parameter of its own (trained through the backward like any other)."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor([1.2]))

    def forward(self, w):
        return w * self.s


PARAMS = ("weight_norm", "orthogonal", "custom", "custom_param", "chain", "bias", "old_weight_norm", "spectral_eval",
          "spectral_train")
REFUSED_PARAMS = ("spectral_train",)  # its power iteration updates buffers in place: lwcompile refuses it by name


def parametrize(mod: nn.Module, how: str) -> None:
    """Parametrize ``mod``'s weight (or bias) in the way named by ``how`` (one of :data:`PARAMS`)."""
    if how == "weight_norm":
        P.weight_norm(mod)
    elif how == "orthogonal":
        P.orthogonal(mod)
    elif how == "custom":
        PZ.register_parametrization(mod, "weight", Smooth())
    elif how == "custom_param":
        PZ.register_parametrization(mod, "weight", LearnedScale())
    elif how == "chain":
        PZ.register_parametrization(mod, "weight", Smooth())
        PZ.register_parametrization(mod, "weight", LearnedScale())
    elif how == "bias":
        PZ.register_parametrization(mod, "bias", LearnedScale())
    elif how == "old_weight_norm":
        with warnings.catch_warnings():  # deprecated in favour of parametrizations.weight_norm: still in use
            warnings.simplefilter("ignore", FutureWarning)
            torch.nn.utils.weight_norm(mod)
    elif how.startswith("spectral"):
        P.spectral_norm(mod)
        if how == "spectral_eval":  # eval: no power iteration, a fixed u, v
            mod.eval()
    else:
        raise ValueError(how)


def after_double(mod: nn.Module, how: str) -> None:
    """The old weight_norm caches its computed weight as a plain attribute (float32, and a non-leaf after a forward,
    which copy.deepcopy refuses): drop it, its pre-hook remakes it at every call."""
    if how == "old_weight_norm" and "weight" in mod.__dict__:
        del mod.weight


def parametrized_attr(how: str) -> str:
    return "bias" if how == "bias" else "weight"


# ---------------------------------------------------------------- side branches
SIDE_MODES = ("nograd", "set_grad", "detach_out", "detach_in", "plain")


def side_forward(mode: str, how: str, branch: nn.Module, scale: torch.Tensor | None, h: torch.Tensor):
    def g_of(x):
        g = branch(x)
        return g * scale if scale is not None else g

    if mode == "nograd":
        with torch.no_grad():
            g = g_of(h)
    elif mode == "set_grad":
        with torch.set_grad_enabled(False):
            g = g_of(h)
    elif mode == "detach_out":
        g = g_of(h).detach()
    elif mode == "detach_in":
        g = g_of(h.detach())
    else:
        g = g_of(h)
    return h + g if how == "add" else h * torch.sigmoid(g)


class Conv1D(nn.Module):
    """HF ``pytorch_utils.Conv1D``: weight (in, out), applied with ``torch.addmm`` on the flattened input."""

    def __init__(self, nf: int, nx: int, bias: bool = True) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx ** 0.5)
        if bias:
            self.bias = nn.Parameter(torch.randn(nf) * 0.2)
        else:  # addmm needs a bias: a buffer (the weight then feeds a matmul outside any block)
            self.register_buffer("bias", torch.randn(nf) * 0.2)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


def addmm_forward(form: str, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, d_in: int,
                  d_out: int) -> torch.Tensor:
    """The addmm forms of fuzz_models.ADDMM_FORMS but Conv1D (a module): on h flattened to 2-D, as GPT-2 does.
    The widths are Python ints and the shape is never unpacked, so torch.fx traces this as it is."""
    size_out = h.shape[:-1] + (d_out,)
    x = h.reshape(-1, d_in)
    if form == "baddbmm":  # a grouped linear: (2, n, in/2) @ (2, in/2, out/2)
        xg = x.view(x.shape[0], 2, d_in // 2).transpose(0, 1)
        z = torch.baddbmm(b, xg, w) if b is not None else torch.bmm(xg, w)
        return z.transpose(0, 1).reshape(size_out)
    if form == "addmm":
        z = torch.addmm(b, x, w)
    elif form == "addmm(ab)":
        z = torch.addmm(b, x, w, beta=0.5, alpha=2.0)
    else:
        z = b.addmm(x, w)
    return z.view(size_out)
