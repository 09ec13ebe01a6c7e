"""Forward/target graph: forward, one backward of the task loss, and every block's input and target.

Two pure steps:
- ``tap(gm, blocks)`` rewrites a copy of the traced graph so it also returns each block's input x, its
  pre-activation â and (when f is not identity) its output ŷ; transfer nodes become out-of-place
  ``apply_transfer`` calls so â survives for the backward.
- ``build_target_graph(...)`` traces, with ``make_fx``, a function of (params, buffers, inputs, labels)
  that runs the tapped graph, the user's loss, ``torch.autograd.grad`` and the target formulas of
  METHOD.md. Its outputs are (loss, x_1..x_M, target_1..target_M, grad of each non-block parameter).

Example:
    >>> import torch, lwcompile
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> prog = lwcompile.transform(m, torch.nn.functional.mse_loss, (torch.randn(5, 3),))
    >>> _ = prog.step(torch.randn(5, 3), torch.randn(5, 2))
    >>> len(prog.target_graph.graph.find_nodes(op="placeholder"))  # 4 params, 1 input, 1 label
    6
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

from lwcompile.errors import LossError, TraceError
from lwcompile.ir import Block
from lwcompile.passes.local_losses import make_target
from lwcompile.passes.transfer import apply_transfer


@dataclass(frozen=True)
class TargetSignature:
    """Names of the target graph's flat inputs and outputs, in order."""

    params: tuple[str, ...]
    buffers: tuple[str, ...]
    n_inputs: int
    n_labels: int
    blocks: tuple[str, ...]
    nonblock: tuple[str, ...]

    @property
    def input_names(self) -> list[str]:
        return ([f"param:{p}" for p in self.params] + [f"buffer:{b}" for b in self.buffers]
                + [f"input:{i}" for i in range(self.n_inputs)] + [f"label:{i}" for i in range(self.n_labels)])

    @property
    def output_names(self) -> list[str]:
        return (["loss"] + [f"block_input:{b}" for b in self.blocks] + [f"target:{b}" for b in self.blocks]
                + [f"grad:{p}" for p in self.nonblock])


def tap(gm: fx.GraphModule, blocks: Sequence[Block]) -> fx.GraphModule:
    """A copy of ``gm`` returning (original output, x_1, â_1, [ŷ_1], x_2, ...)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    by_transfer = {b.transfer_node: b for b in blocks if b.transfer_node}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if node.name in by_transfer:
            b = by_transfer[node.name]
            linear = next(n for n in node.all_input_nodes if n.name == b.node)
            env[node] = graph.call_function(apply_transfer, (env[linear], b.transfer, b.transfer_kwargs))
            env[node].name = node.name
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    nodes = {n.name: n for n in gm.graph.nodes}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    taps = []
    for b in blocks:
        linear = nodes[b.node]
        x = _block_input(linear, gm)
        taps += [env[x], env[linear]]
        if b.transfer_node:
            taps.append(env[nodes[b.transfer_node]])
    orig = fx.node.map_arg(out_node.args[0], lambda n: env[n])
    graph.output((orig, *taps))
    return fx.GraphModule(gm, graph, "Tapped" + type(gm).__name__)


def _block_input(linear: fx.Node, gm: fx.GraphModule) -> fx.Node:
    x = linear.args[0]
    if not isinstance(x, fx.Node):
        raise TraceError(f"block node {linear.name!r}: its input is not a graph value")
    return x


def tap_layout(blocks: Sequence[Block]) -> list[tuple[int, int, int | None]]:
    """Indices of (x, â, ŷ) of each block in the tapped output's tail."""
    out, i = [], 0
    for b in blocks:
        if b.transfer_node:
            out.append((i, i + 1, i + 2))
            i += 3
        else:
            out.append((i, i + 1, None))
            i += 2
    return out


def make_target_fn(tapped: fx.GraphModule, blocks: Sequence[Block], loss_fn: Callable, sig: TargetSignature,
                   target: str, gamma: float, out_spec: Any = None) -> Callable:
    """The Python function the target graph is traced from (also runnable eagerly)."""
    layout = tap_layout(blocks)
    n_p, n_b, n_i = len(sig.params), len(sig.buffers), sig.n_inputs
    nonblock_idx = [sig.params.index(p) for p in sig.nonblock]

    def target_fn(*flat: torch.Tensor):
        params = [p.detach().requires_grad_(True) for p in flat[:n_p]]
        buffers = flat[n_p:n_p + n_b]
        inputs = flat[n_p + n_b:n_p + n_b + n_i]
        labels = flat[n_p + n_b + n_i:]
        state = dict(zip(sig.params, params)) | dict(zip(sig.buffers, buffers))
        with torch.enable_grad():
            outs = torch.func.functional_call(tapped, state, tuple(inputs))
            model_out, tail = outs[0], outs[1:]
            if out_spec is not None:
                model_out = pytree.tree_unflatten(list(model_out), out_spec)
            loss = loss_fn(model_out, *labels)
            check_loss(loss)
            pre = [tail[a] for _, a, _ in layout]
            post = [tail[y] for _, _, y in layout if y is not None]
            wrt = pre + post + [params[i] for i in nonblock_idx]
            grads = torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)
        g_pre, g_post = grads[:len(pre)], list(grads[len(pre):len(pre) + len(post)])
        g_nonblock = grads[len(pre) + len(post):]
        xs, targets = [], []
        for (xi, ai, yi), gp in zip(layout, g_pre):
            a_hat = tail[ai].detach()
            y_hat = tail[yi].detach() if yi is not None else a_hat
            g_y = g_post.pop(0) if yi is not None else gp
            xs.append(tail[xi].detach())
            targets.append(make_target(target, gamma, a_hat, y_hat, gp, g_y))
        return (loss.detach(), *xs, *targets, *g_nonblock)

    return target_fn


def check_loss(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor):
        raise LossError(f"the loss function returned {type(loss).__name__}, not a tensor; return a scalar tensor "
                        "such as F.mse_loss(output, y).")
    if loss.numel() != 1 or loss.dim() > 1:
        raise LossError(f"the loss function returned a tensor of shape {tuple(loss.shape)}, not a scalar; "
                        "reduce it (e.g. .mean()) before returning it.")
    if not loss.dtype.is_floating_point:
        raise LossError(f"the loss function returned dtype {loss.dtype}; it must be a floating-point scalar.")
    if not loss.requires_grad:
        raise LossError("the loss does not depend on the model's parameters (it carries no gradient); "
                        "compute it from the model output without detaching.")


def build_target_graph(target_fn: Callable, flat_example: Sequence[torch.Tensor]) -> fx.GraphModule:
    """Trace ``target_fn`` into an ATen-level GraphModule (fake tensors: nothing runs, no buffer moves)."""
    try:
        gm = make_fx(target_fn, tracing_mode="fake")(*flat_example)
    except (LossError,):
        raise
    except Exception as e:
        raise TraceError(f"could not trace the forward/target graph: {type(e).__name__}: {e}. "
                         "Check that the loss function is differentiable and has no data-dependent Python "
                         "control flow.") from e
    gm.recompile()
    return gm
