"""Stages pass for the partitioned runtime: which rank evaluates each node, and one stage's forward/backward.

``build_layout`` is pure: it reads the program's *tapped* graph (the traced model, returning every block's input,
pre-activation and output) and the rank of each block, and decides for every other node where it runs:

* a block's linear and transfer nodes run on the block's rank;
* any other node runs on the latest rank among its inputs (glue follows its producers), and a node fed only by
  parameters or constants runs on the earliest rank that uses it (a weight's transpose runs with its block);
* placeholders (the model inputs) are read locally on every rank that needs them: every rank gets the batch.

Values whose consumer runs on a later rank are sent forward once per (producer rank, consumer rank); their
gradients come back the same way. The model output goes to the *loss rank* (the last rank that holds blocks).

``stage_graph`` emits each rank's own GraphModule from the layout (its nodes copied out of the tapped graph; it
takes the rank's model inputs and received values and returns, by node name, what later ranks and its own blocks'
targets need). ``Stage`` runs it: ``forward`` (the rank's graph, with autograd on), ``backward`` (one
``torch.autograd.grad`` from the loss and the gradients received for the values sent on) and ``targets`` (the same
``make_target`` rule the one-process target graph traces).

Example:
    >>> import torch, lwcompile
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> prog = lwcompile.transform(m, torch.nn.functional.mse_loss, torch.randn(5, 3))
    >>> lay = build_layout(prog.tapped, prog.blocks, prog.nonblock, {"0": 0, "2": 1})
    >>> lay.sends, lay.loss_rank
    ({(0, 1): ('_1',)}, 1)
    >>> g1 = stage_graph(prog.tapped, lay, 1, keep=())
    >>> [n.name for n in g1.graph.find_nodes(op="placeholder")], list(g1(torch.randn(5, 4)))
    (['_1'], [])
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from lwcompile.errors import ConfigError
from lwcompile.ir import Block
from lwcompile.passes.local_losses import make_offset, make_target
from lwcompile.passes.targets import block_param_alias, check_loss, tap_layout


@dataclass(frozen=True)
class StageLayout:
    """Where every node of the tapped graph runs, and what crosses ranks.

    stage_of:     node name -> rank that evaluates it (placeholders are absent: each rank reads its own batch).
    nodes:        rank -> names of the nodes it evaluates, in graph order.
    placeholders: rank -> names of the model inputs it reads.
    sends:        (src, dst) -> names of the node values src sends dst in the forward (gradients come back).
    loss_rank:    the rank that computes the task loss (the last one holding blocks).
    blocks:       rank -> its block names; params / buffers: rank -> the non-block parameters it trains and
                  the buffers it holds.
    """

    stage_of: Mapping[str, int]
    nodes: Mapping[int, tuple[str, ...]]
    placeholders: Mapping[int, tuple[str, ...]]
    sends: Mapping[tuple[int, int], tuple[str, ...]]
    loss_rank: int
    blocks: Mapping[int, tuple[str, ...]]
    params: Mapping[int, tuple[str, ...]]
    buffers: Mapping[int, tuple[str, ...]]

    def upstream(self, rank: int) -> list[int]:
        """Ranks that send ``rank`` values in the forward, ascending."""
        return sorted(s for s, d in self.sends if d == rank)

    def downstream(self, rank: int) -> list[int]:
        """Ranks ``rank`` sends values to in the forward, ascending."""
        return sorted(d for s, d in self.sends if s == rank)


def build_layout(gm: fx.GraphModule, blocks: Sequence[Block], nonblock: Sequence[str],
                 block_rank: Mapping[str, int]) -> StageLayout:
    """Assign every node of the tapped graph ``gm`` to a rank, given each block's rank (see the module doc)."""
    if set(block_rank) != {b.name for b in blocks}:
        missing = sorted({b.name for b in blocks} - set(block_rank))
        raise ConfigError(f"the plan does not place block(s) {missing[:5]}; make it with prog.plan(...).")
    shared = {id(gm.get_parameter(p)) for p in nonblock}
    for i, b in enumerate(blocks):
        tied = [p for k, p in enumerate(b.params) if id(gm.get_parameter(block_param_alias(i, k))) in shared]
        if tied:  # a stage differentiates with respect to the real tensor, block use included
            raise ConfigError(f"block {b.name!r}: parameter {tied[0]!r} is tied to a use outside the block; "
                              "partitioned mode cannot separate the two uses' gradients. Use mode='replicated'.")
    fixed = {}
    for b in blocks:
        fixed[b.node] = block_rank[b.name]
        if b.transfer_node:
            fixed[b.transfer_node] = block_rank[b.name]
    loss_rank = max(block_rank.values())
    graph_nodes = [n for n in gm.graph.nodes if n.op != "output"]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    orig = {n.name for n in _nodes_in(out_node.args[0][0])}
    stage: dict[str, int | None] = {}
    for n in graph_nodes:  # forward: glue follows its latest producer
        if n.op == "placeholder":
            continue
        ins = [stage[i.name] for i in n.all_input_nodes if stage.get(i.name) is not None]
        if n.name in fixed:
            if ins and max(ins) > fixed[n.name]:
                raise ConfigError(
                    f"node {n.name!r} (a block on rank {fixed[n.name]}) needs a value computed on rank {max(ins)}: "
                    "the plan's stages do not follow the data flow. Make the plan with prog.plan(..., "
                    "mode='partitioned'), whose stages are contiguous in a topological order.")
            stage[n.name] = fixed[n.name]
        else:
            stage[n.name] = max(ins) if ins else None
    for n in reversed(graph_nodes):  # backward: parameter-only nodes run where they are first used
        if n.op == "placeholder" or stage[n.name] is not None:
            continue
        users = [stage[u.name] for u in n.users if u.op != "output"]
        if n.name in orig:
            users.append(loss_rank)
        stage[n.name] = min((u for u in users if u is not None), default=min(block_rank.values()))
    stage_of = {k: v for k, v in stage.items() if v is not None}
    ranks = sorted(set(block_rank.values()) | set(stage_of.values()))
    sends: dict[tuple[int, int], list[str]] = {}
    needs_input: dict[int, set[str]] = {r: set() for r in ranks}
    for n in graph_nodes:
        consumers = {stage_of[u.name] for u in n.users if u.op != "output"}
        if n.name in orig:
            consumers.add(loss_rank)
        if n.op == "placeholder":
            for r in consumers:
                needs_input[r].add(n.name)
            continue
        for r in sorted(consumers - {stage_of[n.name]}):
            if r < stage_of[n.name]:
                raise ConfigError(f"node {n.name!r} runs on rank {stage_of[n.name]} but feeds rank {r}: values must "
                                  "flow forward. This is a bug in the stage layout; please report it.")
            sends.setdefault((stage_of[n.name], r), []).append(n.name)
    params, buffers = _owners(gm, graph_nodes, stage_of, set(nonblock), loss_rank)
    order = [n.name for n in graph_nodes]
    return StageLayout(
        stage_of=stage_of,
        nodes={r: tuple(n for n in order if stage_of.get(n) == r) for r in ranks},
        placeholders={r: tuple(n for n in order if n in needs_input[r]) for r in ranks},
        sends={k: tuple(v) for k, v in sorted(sends.items())},
        loss_rank=loss_rank,
        blocks={r: tuple(b.name for b in blocks if block_rank[b.name] == r) for r in ranks},
        params={r: tuple(p for p in nonblock if params.get(p) == r) for r in ranks},
        buffers={r: tuple(b for b, o in buffers.items() if o == r) for r in ranks},
    )


def _nodes_in(arg: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(arg, lambda n: found.append(n) or n)
    return found


def _owners(gm: fx.GraphModule, nodes: Sequence[fx.Node], stage_of: Mapping[str, int], nonblock: set[str],
            default: int) -> tuple[dict[str, int], dict[str, int]]:
    """Which rank holds each parameter and buffer. A non-block parameter read on two ranks would get two partial
    gradients: refused (it is fine when read through one get_attr node whose value is sent on)."""
    params: dict[str, int] = {}
    buffers: dict[str, int] = {}
    param_names = {name for name, _ in gm.named_parameters()}
    for n in nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            found = [(f"{n.target}.{k}", True) for k, _ in mod.named_parameters()]
            found += [(f"{n.target}.{k}", False) for k, _ in mod.named_buffers()]
        elif n.op == "get_attr":
            found = [(n.target, n.target in param_names)]
        else:
            continue
        for name, is_param in found:
            table = params if is_param else buffers
            if is_param and name in table and table[name] != stage_of[n.name] and name in nonblock:
                raise ConfigError(
                    f"parameter {name!r} is used on ranks {table[name]} and {stage_of[n.name]} (node {n.name!r}): "
                    "partitioned mode needs each non-block parameter in one stage. Use mode='replicated', or a plan "
                    "that keeps its users together.")
            table.setdefault(name, stage_of[n.name])
    for p in nonblock:
        params.setdefault(p, default)  # unused: its (zero) gradient is stepped where the loss is
    for name, _ in gm.named_buffers():
        buffers.setdefault(name, default)
    return params, buffers


def grad_leaves(values: Sequence[Any]) -> list[torch.Tensor]:
    """The tensors among ``values`` (pytrees) that carry gradients, in order."""
    return [t for v in values for t in pytree.tree_leaves(v) if isinstance(t, torch.Tensor) and t.requires_grad]


def stage_graph(gm: fx.GraphModule, layout: StageLayout, rank: int, keep: Sequence[str]) -> fx.GraphModule:
    """Emit rank ``rank``'s own graph: the nodes ``layout`` gives it, copied from the tapped graph ``gm``.

    Pre: ``layout`` was built from ``gm``. Post: the graph's placeholders are the model inputs the rank reads
    (``layout.placeholders[rank]``) followed by the values received from earlier ranks (in ``layout.sends``
    order); it returns a dict from original node name to value for every value another rank needs and every
    name in ``keep``. Submodules and parameters are shared with ``gm`` (same tensors), so autograd through the
    stage graph reaches the model's parameters.
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    for name in layout.placeholders.get(rank, ()):
        env[name] = g.placeholder(name)
    for src in layout.upstream(rank):
        for name in layout.sends[(src, rank)]:
            env[name] = g.placeholder(name)
    for name in layout.nodes.get(rank, ()):
        env[name] = g.node_copy(by_name[name], lambda n: env[n.name])
    wanted = [n for dst in layout.downstream(rank) for n in layout.sends[(rank, dst)]] + list(keep)
    g.output({n: env[n] for n in dict.fromkeys(wanted) if n in env})
    out = fx.GraphModule(gm, g, class_name=f"Stage{rank}")
    out.graph.lint()
    return out


class Stage:
    """One rank's part of the forward/target computation: its emitted graph (:func:`stage_graph`) and the
    backward and targets around it. Holds no state between steps."""

    grad_leaves = staticmethod(grad_leaves)  # the runtime sends and receives exactly these

    def __init__(self, gm: fx.GraphModule, layout: StageLayout, rank: int, blocks: Sequence[Block]) -> None:
        self.layout = layout
        self.rank = rank
        out = next(n for n in gm.graph.nodes if n.op == "output")
        self.orig = out.args[0][0]  # the model output's structure (read by node name, never run)
        taps = [n.name for n in out.args[0][1:]]
        mine = set(layout.blocks.get(rank, ()))
        self.taps = [(b, taps[xi], taps[ai], taps[yi] if yi is not None else None)
                     for b, (xi, ai, yi) in zip(blocks, tap_layout(blocks)) if b.name in mine]
        keep = [t for tap in self.taps for t in tap[1:] if t is not None]
        if rank == layout.loss_rank:
            keep += [n.name for n in _nodes_in(out.args[0][0])]
        self.graph = stage_graph(gm, layout, rank, keep)
        self._defaults = {n.name: n.args for n in gm.graph.find_nodes(op="placeholder")}
        self.placeholder_index = {n.name: i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))}

    def forward(self, inputs: Sequence[Any], received: Mapping[str, Any]) -> dict[str, Any]:
        """Run this rank's graph on the batch and the values received from earlier ranks; returns every value
        the rank reads or produces for others, by node name."""
        env: dict[str, Any] = {}
        for name in self.layout.placeholders.get(self.rank, ()):
            i = self.placeholder_index[name]
            if i < len(inputs):
                env[name] = inputs[i]
            elif self._defaults[name]:
                env[name] = self._defaults[name][0]  # a default argument of forward()
            else:
                raise ConfigError(f"the model needs input {name!r} (position {i}) but step() got "
                                  f"{len(inputs)} input(s).")
        args = [env[n] for n in self.layout.placeholders.get(self.rank, ())]
        args += [received[n] for src in self.layout.upstream(self.rank) for n in self.layout.sends[(src, self.rank)]]
        env.update(received)
        with torch.enable_grad():
            env.update(self.graph(*args))
        return env

    def values_for(self, env: Mapping[str, Any], dst: int) -> list[Any]:
        """What this rank sends ``dst`` in the forward."""
        return [env[n] for n in self.layout.sends[(self.rank, dst)]]

    def loss(self, env: Mapping[str, Any], labels: Sequence[Any], loss_fn: Callable, out_spec: Any) -> torch.Tensor:
        """The task loss (on the loss rank), computed as the one-process target graph does."""
        out = fx.node.map_arg(self.orig, lambda n: env[n.name])
        if out_spec is not None:
            out = pytree.tree_unflatten(list(out), out_spec)
        with torch.enable_grad():
            loss = loss_fn(out, *labels)
        check_loss(loss)
        return loss

    def backward(self, env: Mapping[str, Any], loss: torch.Tensor | None,
                 sent: Sequence[tuple[Sequence[Any], Sequence[torch.Tensor]]], received: Sequence[torch.Tensor],
                 params: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Gradients of the loss with respect to this rank's (â, ŷ) taps, its non-block ``params`` and the
        ``received`` leaves, from the local loss (if any) and the gradients ``sent`` values got downstream."""
        outs: list[torch.Tensor] = []
        gouts: list[torch.Tensor] = []
        for values, grads in sent:
            leaves = grad_leaves(values)
            if len(leaves) != len(grads):
                raise ConfigError(f"rank {self.rank}: got {len(grads)} gradients for {len(leaves)} values sent on.")
            outs += leaves
            gouts += list(grads)
        if loss is not None:
            outs.append(loss)
            gouts.append(torch.ones_like(loss))
        taps = [env[a] for _, _, a, _ in self.taps] + [env[y] for _, _, _, y in self.taps if y is not None]
        wrt = taps + list(params) + list(received)
        if not wrt:
            return [], [], []
        if outs:
            grads = list(torch.autograd.grad(outs, wrt, gouts, allow_unused=True, materialize_grads=True))
        else:
            grads = [torch.zeros_like(t) for t in wrt]
        n_t, n_p = len(taps), len(params)
        return grads[:n_t], grads[n_t:n_t + n_p], grads[n_t + n_p:]

    def targets(self, env: Mapping[str, Any], tap_grads: Sequence[torch.Tensor], kind: str,
                gamma: float, offsets: dict[str, torch.Tensor] | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Each own block's input and target (METHOD.md step 3), from the tap gradients of :meth:`backward`.
        ``offsets``: a dict that also receives each block's target offset γ·g (what the offset-form inner
        graphs take, :meth:`lwcompile.Program.inner_jobs`)."""
        m = len(self.taps)
        g_pre, g_post = list(tap_grads[:m]), list(tap_grads[m:])
        xs, targets = {}, {}
        with torch.no_grad():
            for (b, x, a, y), gp in zip(self.taps, g_pre):
                a_hat = env[a].detach()
                y_hat = env[y].detach() if y is not None else a_hat
                g_y = g_post.pop(0) if y is not None else gp
                xs[b.name] = env[x].detach()
                targets[b.name] = make_target(kind, gamma, a_hat, y_hat, gp, g_y)
                if offsets is not None:
                    offsets[b.name] = make_offset(kind, gamma, gp, g_y)
        return xs, targets
