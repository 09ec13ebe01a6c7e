"""Signature records of the emitted graphs: they pack inputs and unpack outputs by name.

Every emitted graph takes and returns flat tuples of tensors (what FX, ONNX and torch.distributed move around).
Only these records know the order, in the manner of ``torch.export``'s ``ExportGraphSignature``: callers say
``sig.unpack(outs).targets["fc1"]``, never ``outs[1 + m + i]``.

Example:
    >>> import torch
    >>> sig = InnerSignature(params=("weight", "bias"), n_state=2)
    >>> sig.input_names
    ['weight', 'bias', 'x', 'target', 'lr', 'state0', 'state1']
    >>> new, state = sig.unpack((torch.zeros(1), torch.ones(1), torch.zeros(1), torch.zeros(1)))
    >>> len(new), len(state)
    (2, 2)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

Tensors = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class TargetOutputs:
    """The forward/target graph's results by name."""

    loss: torch.Tensor
    inputs: Mapping[str, torch.Tensor]  # block name -> its input x
    targets: Mapping[str, torch.Tensor]  # block name -> its target (METHOD.md step 3)
    grads: Mapping[str, torch.Tensor]  # non-block parameter -> ∂L/∂p (its uses outside blocks)
    preacts: Mapping[str, torch.Tensor] = field(default_factory=dict)  # block name -> â = op(x; W, b), when returned
    offsets: Mapping[str, torch.Tensor] = field(default_factory=dict)  # block name -> base − target = γ·g, if returned


@dataclass(frozen=True)
class TargetSignature:
    """The target graph: (params, buffers, inputs, labels) -> (loss, block inputs, block targets, non-block grads
    [, block pre-activations]). ``preacts=True`` appends each block's pre-activation â, which the forward pass
    computed anyway, so the inner graphs need not recompute it (``Config.reuse_preactivation``). ``offsets=True``
    appends each block's target offset d = base − target (γ·∂L/∂â or γ·∂L/∂ŷ, formed from the gradient, not from
    the target), which the offset-form inner graphs take instead of the target (full precision of γ·g)."""

    params: tuple[str, ...]
    buffers: tuple[str, ...]
    n_inputs: int
    n_labels: int
    blocks: tuple[str, ...]
    nonblock: tuple[str, ...]
    preacts: bool = False
    offsets: bool = False

    @property
    def input_names(self) -> list[str]:
        return ([f"param:{p}" for p in self.params] + [f"buffer:{b}" for b in self.buffers]
                + [f"input:{i}" for i in range(self.n_inputs)] + [f"label:{i}" for i in range(self.n_labels)])

    @property
    def output_names(self) -> list[str]:
        return (["loss"] + [f"block_input:{b}" for b in self.blocks] + [f"target:{b}" for b in self.blocks]
                + [f"grad:{p}" for p in self.nonblock] + ([f"preact:{b}" for b in self.blocks] if self.preacts else [])
                + ([f"offset:{b}" for b in self.blocks] if self.offsets else []))

    def pack(self, params: Mapping[str, Any], buffers: Mapping[str, Any], inputs: Sequence[Any],
             labels: Sequence[Any]) -> list[Any]:
        """The flat argument list, from parameters and buffers by name and the batch."""
        if len(inputs) != self.n_inputs or len(labels) != self.n_labels:
            raise ValueError(f"the target graph takes {self.n_inputs} input(s) and {self.n_labels} label(s), "
                             f"got {len(inputs)} and {len(labels)}")
        return ([params[p] for p in self.params] + [buffers[b] for b in self.buffers] + list(inputs) + list(labels))

    def unpack(self, outs: Sequence[Any]) -> TargetOutputs:
        """The graph's flat outputs as a :class:`TargetOutputs`."""
        m, k = len(self.blocks), len(self.nonblock)
        if len(outs) != len(self.output_names):
            raise ValueError(f"the target graph returned {len(outs)} values, its signature names "
                             f"{len(self.output_names)}")
        i = 1 + 2 * m + k  # the optional tails: pre-activations, then offsets
        preacts = dict(zip(self.blocks, outs[i:i + m])) if self.preacts else {}
        i += m if self.preacts else 0
        offsets = dict(zip(self.blocks, outs[i:i + m])) if self.offsets else {}
        return TargetOutputs(outs[0], dict(zip(self.blocks, outs[1:1 + m])), dict(zip(self.blocks, outs[1 + m:1 + 2 * m])),
                             dict(zip(self.nonblock, outs[1 + 2 * m:1 + 2 * m + k])), preacts, offsets)


@dataclass(frozen=True)
class InnerSignature:
    """A block's inner-update graph: (params, x, target, lr, [preact], *state) -> (new params, *new state).

    ``preact=True``: the graph also takes the forward pass's pre-activation â = op(x; W, b) and uses it as its
    first iteration's (or the exact solve's) z instead of recomputing it. ``offset=True``: the target's slot
    holds its offset d = base − t (``TargetOutputs.offsets``; see :func:`lwcompile.passes.inner.make_inner_fn`)."""

    params: tuple[str, ...]  # "weight"[, "bias"]
    n_state: int
    preact: bool = False
    offset: bool = False  # the input after x is the target's offset d = base − t ("offset"), not t ("target")

    @property
    def input_names(self) -> list[str]:
        return (list(self.params) + ["x", "offset" if self.offset else "target", "lr"]
                + (["preact"] if self.preact else [])
                + [f"state{i}" for i in range(self.n_state)])

    @property
    def output_names(self) -> list[str]:
        return [f"new_{p}" for p in self.params] + [f"new_state{i}" for i in range(self.n_state)]

    def names(self) -> tuple[list[str], list[str]]:
        """(input names, output names), the graph's and its ONNX file's."""
        return self.input_names, self.output_names

    def pack(self, params: Sequence[Any], x: Any, target: Any, lr: Any, state: Sequence[Any],
             preact: Any = None) -> list[Any]:
        if len(params) != len(self.params) or len(state) != self.n_state:
            raise ValueError(f"the inner graph takes {len(self.params)} parameter(s) and {self.n_state} state "
                             f"tensor(s), got {len(params)} and {len(state)}")
        if (preact is not None) != self.preact:
            raise ValueError("this inner graph takes the block's pre-activation" if self.preact else
                             "this inner graph has no pre-activation input")
        return [*params, x, target, lr, *([preact] if self.preact else []), *state]

    def unpack(self, outs: Sequence[Any]) -> tuple[tuple, tuple]:
        """(new parameter values, new optimizer state)."""
        k = len(self.params)
        if len(outs) != k + self.n_state:
            raise ValueError(f"the inner graph returned {len(outs)} values, its signature names {k + self.n_state}")
        return tuple(outs[:k]), tuple(outs[k:])
