"""Forward/target graph: forward, one backward of the task loss, and every block's input and target.

Two pure steps:
- ``tap(gm, blocks)`` rewrites a copy of the traced graph so it also returns each block's input x, its
  pre-activation â and (when f is not identity) its output ŷ; transfer nodes become out-of-place
  ``apply_transfer`` calls so â survives for the backward.
- ``build_target_graph(...)`` traces, with ``make_fx``, a function of (params, buffers, inputs, labels)
  that runs the tapped graph, the user's loss, ``torch.autograd.grad`` and the target formulas of
  METHOD.md. Its outputs are (loss, x_1..x_M, target_1..target_M, grad of each non-block parameter[, â_1..â_M]
  [, d_1..d_M]); d = base − target = γ·g is each target's offset, formed from the gradient (see
  :func:`lwcompile.passes.inner.make_inner_fn`'s offset form).

Example:
    >>> import torch, lwcompile
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> prog = lwcompile.transform(m, torch.nn.functional.mse_loss, (torch.randn(5, 3),))
    >>> _ = prog.step(torch.randn(5, 3), torch.randn(5, 2))
    >>> len(prog.target_graph.graph.find_nodes(op="placeholder"))  # 4 params, 1 input, 1 label
    6
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

from lwcompile.errors import LossError, TraceError, describe_values, first_line
from lwcompile.ir import Block
from lwcompile.passes.linear_ops import LINEAR_OPS
from lwcompile.passes.local_losses import make_offset, make_target
from lwcompile.passes.registry import is_transpose_of_2d
from lwcompile.passes.signatures import TargetSignature
from lwcompile.passes.transfer import apply_transfer


_ALIAS = "_lw_block"


def block_param_alias(i: int, k: int) -> str:
    """The attribute through which the tapped graph's block ``i`` reads its parameter ``k`` (0 weight, 1 bias)."""
    return f"{_ALIAS}{i}_" + ("weight", "bias")[k]


def tap(gm: fx.GraphModule, blocks: Sequence[Block]) -> fx.GraphModule:
    """A copy of ``gm`` returning (original output, x_1, â_1, [ŷ_1], x_2, ...).

    Each block's linear op becomes ``apply_linear(x, W, b)`` (the same function the inner loop runs), reading W
    and b through attributes of its own (:func:`block_param_alias`). So the block's use of a parameter is a
    separate leaf when the target graph differentiates: a weight that is also read elsewhere (tied weights)
    gets the gradient of its other uses alone, and the block's share comes through its local loss.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    by_transfer = {b.transfer_node: b for b in blocks if b.transfer_node}
    by_linear = {b.node: (i, b) for i, b in enumerate(blocks)}
    nodes = {n.name: n for n in gm.graph.nodes}
    aliases: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if node.name in by_transfer:
            b = by_transfer[node.name]
            linear = next(n for n in node.all_input_nodes if n.name == b.node)
            env[node] = graph.call_function(apply_transfer, (env[linear], b.transfer, b.transfer_kwargs))
        elif node.name in by_linear:
            i, b = by_linear[node.name]
            params = []
            for k, p in enumerate(b.params):
                alias = block_param_alias(i, k)
                aliases[alias] = gm.get_parameter(p)
                params.append(graph.get_attr(alias))
            x = env[nodes[b.input_node]] if b.input_node else env[_block_input(node, gm)]
            env[node] = graph.call_function(apply_linear, (x, params[0], params[1] if b.bias else None,
                                                           b.op, b.attrs))
        elif node.op == "call_module" and is_cumulative_batch_norm(gm.get_submodule(node.target)):
            mod, t = gm.get_submodule(node.target), node.target
            state = [graph.get_attr(f"{t}.{a}") if getattr(mod, a) is not None else None
                     for a in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
            env[node] = graph.call_function(cumulative_batch_norm, (env[node.args[0]], *state, mod.eps))
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
            continue
        env[node].name = node.name
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    taps = []
    for b in blocks:
        linear = nodes[b.node]
        x = nodes[b.input_node] if b.input_node else _block_input(linear, gm)
        taps += [env[x], env[linear]]
        if b.transfer_node:
            taps.append(env[nodes[b.transfer_node]])
    orig = fx.node.map_arg(out_node.args[0], lambda n: env[n])
    graph.output((orig, *taps))
    graph.eliminate_dead_code(is_impure_node=lambda n: not _is_weight_glue(n))  # the replaced ops' weight reads
    root = torch.nn.Module()  # the tapped module's own root: block aliases never land on the user's modules
    for name, p in aliases.items():
        root.register_parameter(name, p)
    for n in graph.find_nodes(op="get_attr") + graph.find_nodes(op="call_module"):
        top = n.target.split(".")[0]
        if not hasattr(root, top):
            setattr(root, top, getattr(gm, top))
    return fx.GraphModule(root, graph, "Tapped" + type(gm).__name__)


def is_cumulative_batch_norm(m: torch.nn.Module) -> bool:
    """A train-mode BatchNorm with ``momentum=None``: its running average needs :func:`cumulative_batch_norm`."""
    return (isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training and m.momentum is None
            and m.track_running_stats)


def cumulative_batch_norm(x, weight, bias, running_mean, running_var, num_batches_tracked, eps: float):
    """``nn.BatchNorm*(momentum=None)`` in training mode with tensor ops only. The module computes its factor
    as ``1.0 / float(num_batches_tracked)``, a Python float read from a buffer, which cannot be traced."""
    num_batches_tracked.add_(1)
    out = torch.nn.functional.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
    with torch.no_grad():
        xd = x.detach()
        dims = [0, *range(2, xd.dim())]
        factor = 1.0 / num_batches_tracked.to(running_mean.dtype)
        running_mean.mul_(1 - factor).add_(factor * xd.mean(dims))
        running_var.mul_(1 - factor).add_(factor * xd.var(dims, correction=1))
    return out


def _block_input(linear: fx.Node, gm: fx.GraphModule) -> fx.Node:
    """A block's input when its record does not name it (hand-built Blocks): the op's first argument."""
    x = linear.args[0] if linear.args else linear.kwargs.get("input")
    if not isinstance(x, fx.Node):
        raise TraceError(f"block node {linear.name!r}: its input is not a graph value")
    return x


def _is_weight_glue(n: fx.Node) -> bool:
    """Side-effect-free reads of a weight (get_attr, a transpose) that may be dropped once unused."""
    return n.op == "get_attr" or is_transpose_of_2d(n)


def apply_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, op: str, attrs: tuple) -> torch.Tensor:
    """A block's linear op, as the inner loop computes it: â = op(x; W, b)."""
    return LINEAR_OPS[op].apply(x, w, b, dict(attrs))


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
                   target: str, gamma: float, out_spec: Any = None,
                   param_tensors: Sequence[torch.Tensor] | None = None) -> Callable:
    """The Python function the target graph is traced from (also runnable eagerly).

    ``param_tensors`` are the tensors named by ``sig.params`` (default: looked up in ``tapped``); every name the
    tapped module reaches a tensor by becomes a leaf of its own, and a non-block tensor's gradient is the sum
    over its names, so tied weights get each use's gradient exactly once.
    """
    layout = tap_layout(blocks)
    n_p, n_b, n_i = len(sig.params), len(sig.buffers), sig.n_inputs
    if param_tensors is None:
        param_tensors = [tapped.get_parameter(p) for p in sig.params]
    index = {id(t): i for i, t in enumerate(param_tensors)}
    leaf_names = [(name, index[id(t)]) for name, t in tapped.named_parameters(remove_duplicate=False)]
    buf_index = {name: i for i, name in enumerate(sig.buffers)}
    buffer_names = [(name, buf_index[name]) for name, _ in tapped.named_buffers(remove_duplicate=False)
                    if name in buf_index]
    nonblock_idx = [sig.params.index(p) for p in sig.nonblock]

    def target_fn(*flat: torch.Tensor):
        leaves = [(name, i, flat[i].detach().requires_grad_(True)) for name, i in leaf_names]
        buffers = flat[n_p:n_p + n_b]
        inputs = flat[n_p + n_b:n_p + n_b + n_i]
        labels = flat[n_p + n_b + n_i:]
        state = {name: leaf for name, _, leaf in leaves} | {name: buffers[i] for name, i in buffer_names}
        with torch.enable_grad():
            outs = torch.func.functional_call(tapped, state, tuple(inputs), tie_weights=False)
            model_out, tail = outs[0], outs[1:]
            if out_spec is not None:
                model_out = pytree.tree_unflatten(list(model_out), out_spec)
            loss = call_loss(loss_fn, model_out, labels)
            pre = [tail[a] for _, a, _ in layout]
            post = [tail[y] for _, _, y in layout if y is not None]
            uses = [[leaf for name, i, leaf in leaves if i == j and not name.startswith(_ALIAS)] for j in nonblock_idx]
            wrt = pre + post + [leaf for group in uses for leaf in group]
            grads = torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)
        g_pre, g_post = grads[:len(pre)], list(grads[len(pre):len(pre) + len(post)])
        rest = list(grads[len(pre) + len(post):])
        g_nonblock = []
        for group, j in zip(uses, nonblock_idx):
            parts = [rest.pop(0) for _ in group]
            g_nonblock.append(_sum(parts) if parts else torch.zeros_like(flat[j]))
        xs, targets, preacts, offsets = [], [], [], []
        for (xi, ai, yi), gp in zip(layout, g_pre):
            a_hat = tail[ai].detach()
            y_hat = tail[yi].detach() if yi is not None else a_hat
            g_y = g_post.pop(0) if yi is not None else gp
            xs.append(tail[xi].detach())
            targets.append(make_target(target, gamma, a_hat, y_hat, gp, g_y))
            preacts.append(a_hat)
            offsets.append(make_offset(target, gamma, gp, g_y))
        return (loss.detach(), *xs, *targets, *g_nonblock, *(preacts if sig.preacts else ()),
                *(offsets if sig.offsets else ()))

    return target_fn


def _sum(ts: list[torch.Tensor]) -> torch.Tensor:
    out = ts[0]
    for t in ts[1:]:
        out = out + t
    return out


def call_loss(loss_fn: Callable, output: Any, labels: Sequence[Any]) -> torch.Tensor:
    """``loss_fn(output, *labels)``, checked; its own failure is reported as a :class:`LossError`."""
    try:
        loss = loss_fn(output, *labels)
    except LossError:
        raise
    except Exception as e:
        outs, labs = describe_values(pytree.tree_leaves(output)), describe_values(labels)
        raise LossError(f"the loss function failed on the model output ({outs}) and the labels ({labs}): "
                        f"{first_line(e)}. Check "
                        "the labels' dtype and shape (e.g. F.cross_entropy takes int64 class indices, or float "
                        "class probabilities shaped like the output).") from e
    check_loss(loss)
    return loss


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


@contextlib.contextmanager
def _tracing_context(recurrent: bool) -> Iterator[None]:
    """While tracing the target graph: fake-tensor failure logs dropped and, for recurrent models, the fused
    RNN kernels (oneDNN on CPU, cuDNN on CUDA) off.

    * A fused RNN kernel's backward needs the workspace its forward returns only in some modes: on CPU a
      float32 ``nn.LSTM`` is recorded as ``mkldnn_rnn_layer``, whose workspace exists only under grad mode, and
      the target graph runs under ``no_grad`` (the first step failed in ``mkldnn_rnn_layer_backward``); on
      CUDA ``_cudnn_rnn`` cannot be traced with fake tensors at all. With them off, ``nn.LSTM``/``GRU``/``RNN``
      are recorded as plain ATen ops. Only recurrent models: with cuDNN off, BatchNorm on CUDA would also be
      recorded as ``native_batch_norm`` instead of ``cudnn_batch_norm``.
    * FakeTensor logs every failing meta kernel with a traceback at ERROR level (e.g. float labels given to
      cross_entropy); the error itself reaches the user as a LossError/TraceError, so the log is noise.
    """
    log = logging.getLogger("torch._subclasses.fake_tensor")
    drop = lambda record: not record.getMessage().startswith("failed while attempting to run meta")  # noqa: E731
    fused = torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled
    if recurrent:  # only the "enabled" flags (the flags() context managers also reset TF32 etc., and warn)
        torch.backends.mkldnn.enabled = torch.backends.cudnn.enabled = False
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)
        torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled = fused


def build_target_graph(target_fn: Callable, flat_example: Sequence[torch.Tensor],
                       recurrent: bool = False) -> fx.GraphModule:
    """Trace ``target_fn`` into an ATen-level GraphModule (fake tensors: nothing runs, no buffer moves).
    ``recurrent``: the model has ``nn.RNNBase`` modules (see :func:`_tracing_context`)."""
    try:
        # Tensors a loss holds (CrossEntropyLoss(weight=...)) are real, not fake: let them in as constants.
        with _tracing_context(recurrent):
            gm = make_fx(target_fn, tracing_mode="fake", _allow_non_fake_inputs=True)(*flat_example)
    except (LossError,):
        raise
    except Exception as e:
        raise TraceError(f"could not trace the forward/target graph: {type(e).__name__}: {e}. "
                         "Check that the loss function is differentiable and has no data-dependent Python "
                         "control flow.") from e
    gm.recompile()
    return gm
