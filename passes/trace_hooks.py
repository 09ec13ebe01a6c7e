"""What ``torch.fx.symbolic_trace`` does not see on its own: module hooks and ``torch.no_grad()`` regions.

* **Forward hooks and pre-hooks.** fx records a leaf module (``nn.Linear``, ``nn.Tanh``) as one ``call_module``
  node and calls the root's ``forward`` directly, so neither runs its hooks while tracing; the graph still ran
  a leaf's hooks when called, but the later passes replace block ops by their own functions, and the compiled
  step silently computed the hook-free model. Here a module with forward hooks is traced *through* (its
  ``forward`` and hooks become plain graph nodes, run once), and the root's hooks are run around the traced
  ``forward`` by ``nn.Module.__call__`` itself (:func:`call_with_hooks`), so every hook form torch supports
  (``with_kwargs=True``, ``prepend``, ``always_call``) means exactly what it means eagerly.
* **Hooks lwcompile cannot compile** (module backward hooks, global module hooks) are refused by name
  (:func:`refuse_unsupported_hooks`): the graphs compute their own gradients and cannot run them. So is the
  hook-based ``torch.nn.utils.spectral_norm`` in training mode (its pre-hook's power iteration mutates buffers).
* **Grad mode.** fx runs ``forward``'s Python, so ``torch.no_grad()`` really switches grad mode off while its
  ops are recorded, but nothing in the graph remembers it. :func:`no_grad_marks` tags each node made with grad
  mode off and :func:`cut_no_grad_regions` detaches the values such a region hands to the rest of the graph,
  which is what eager autograd does (a tensor made under ``no_grad`` has no history).

Example:
    >>> import torch
    >>> lin = torch.nn.Linear(3, 2)
    >>> h = lin.register_forward_hook(lambda m, args, out: out * 2)
    >>> has_forward_hooks(lin)
    True
    >>> h.remove(); has_forward_hooks(lin)
    False
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules import module as _module
from torch.utils import _pytree as pytree

from lwcompile.errors import TraceError

NO_GRAD = "lwcompile_no_grad"  # node.meta key: the node was recorded with grad mode off
_MODULE_CALL = nn.Module.__call__  # captured at import, before any fx trace patches it


def has_forward_hooks(m: nn.Module) -> bool:
    """Whether ``m`` has forward hooks or forward pre-hooks of its own."""
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _hook_name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def refuse_unsupported_hooks(model: nn.Module) -> None:
    """Raise :class:`TraceError` for hooks the compiled graphs cannot run: global module hooks
    (``torch.nn.modules.module.register_module_forward_hook`` and friends) and module backward hooks."""
    globals_ = {"register_module_forward_pre_hook": _module._global_forward_pre_hooks,
                "register_module_forward_hook": _module._global_forward_hooks,
                "register_module_full_backward_pre_hook": _module._global_backward_pre_hooks,
                "register_module_full_backward_hook": _module._global_backward_hooks}
    for register, hooks in globals_.items():
        if hooks:
            names = ", ".join(_hook_name(h) for h in hooks.values())
            raise TraceError(f"global module hooks are registered (torch.nn.modules.module.{register}: {names}); "
                             "lwcompile traces each model's own hooks but cannot compile hooks on every module. "
                             "Remove them (handle.remove()) before lwcompile.transform, or register the hook on "
                             "the modules it is meant for.")
    for name, m in model.named_modules():
        _refuse_training_spectral_norm(name, m)
        for kind in ("_backward_pre_hooks", "_backward_hooks"):
            hooks = getattr(m, kind, None)
            if hooks:
                names = ", ".join(_hook_name(h) for h in hooks.values())
                raise TraceError(f"module {name or '(root)'!r} ({type(m).__name__}) has a backward hook ({names}); "
                                 "lwcompile computes gradients and block targets in its own graphs and cannot run "
                                 "it. Remove it (handle.remove()) before lwcompile.transform, or express it in "
                                 "forward (e.g. a custom torch.autograd.Function).")


def _refuse_training_spectral_norm(name: str, m: nn.Module) -> None:
    """The hook-based ``torch.nn.utils.spectral_norm`` in training mode: its forward pre-hook runs a power
    iteration that updates the ``<weight>_u``/``_v`` buffers in place (under no_grad) and caches the weight on the
    module at every call; traced once, the compiled step would freeze one iteration's u, v into the graph and the
    model's buffers would stop moving. In eval mode the hook only divides by σ = uᵀWv with fixed u, v, which
    traces exactly (the SGD identity holds), so only training mode is refused."""
    from torch.nn.utils.spectral_norm import SpectralNorm

    if not m.training:
        return
    for hook in m._forward_pre_hooks.values():
        if isinstance(hook, SpectralNorm):
            raise TraceError(
                f"module {name or '(root)'!r} ({type(m).__name__}) uses the hook-based torch.nn.utils.spectral_norm "
                f"on {hook.name!r} in training mode: its forward pre-hook updates the power-iteration buffers "
                f"{hook.name}_u/{hook.name}_v in place at every call, which the compiled step cannot reproduce. Call "
                ".eval() on the module (σ from the stored u, v: compiled exactly), or remove it with "
                "torch.nn.utils.remove_spectral_norm; torch.nn.utils.parametrizations.spectral_norm is its "
                "maintained replacement (also compiled in eval mode only).")


def call_with_hooks(root: nn.Module, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(root, *args)`` (the root's traced forward) run by ``nn.Module.__call__``, so the root's forward hooks
    and pre-hooks are traced around it with torch's own semantics."""

    @functools.wraps(fn)
    def hooked(self_: nn.Module, *args: Any) -> Any:
        def forward(*a: Any, **kw: Any) -> Any:
            return fn(self_, *a, **kw)

        had = "forward" in vars(root)
        saved = vars(root).get("forward")
        vars(root)["forward"] = forward  # Module.__call__ calls self.forward: the instance attribute wins
        try:
            return _MODULE_CALL(root, *args)
        finally:
            if had:
                vars(root)["forward"] = saved
            else:
                del vars(root)["forward"]

    return hooked


def no_grad_marks(node: fx.Node) -> fx.Node:
    """Tag ``node`` when it is an op recorded with grad mode off (called from the tracer's ``create_node``)."""
    if node.op.startswith("call_") and not torch.is_grad_enabled():
        node.meta[NO_GRAD] = True
    return node


def no_grad_value(value: Any) -> Any:
    """A value made under ``torch.no_grad()``, as the rest of the graph sees it: every tensor detached."""
    return pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, value)


def cut_no_grad_regions(gm: fx.GraphModule) -> fx.GraphModule:
    """Detach every value a ``no_grad`` region hands to grad-enabled nodes (or the output); returns ``gm``.
    Inside a region nothing is needed: no gradient enters it once its exits are cut."""
    graph = gm.graph
    changed = False
    for node in list(graph.nodes):
        if not node.meta.get(NO_GRAD):
            continue
        outside = [u for u in node.users if not u.meta.get(NO_GRAD)]
        if not outside:
            continue
        with graph.inserting_after(node):
            cut = graph.create_node("call_function", no_grad_value, (node,), {}, name=f"{node.name}_no_grad")
        for u in outside:
            u.replace_input_with(node, cut)
        changed = True
    if changed:
        graph.lint()
        gm.recompile()
    return gm
