"""Inner graphs shared across shapes: one trace per (op, attributes, transfer, config), not per channel count.

A block's inner graph (:mod:`lwcompile.passes.inner`) is traced with fake tensors for one set of shapes. For a
convolution (groups 1) nothing in the graph depends on the channel counts, the batch size or the spatial size: the
weight gradient takes the weight itself (its shape only) and every other op reads shapes from its inputs at run
time. So ResNet's twenty-odd 1×1 and 3×3 convs of different widths can run one graph per kind.

That is checked, not assumed: the first block of a kind is traced for its own shapes; when a second block of the
kind arrives, the kind is traced once more for *sentinel* shapes (every size above 1 replaced by a distinct prime
above 10 000, so that no constant derived from any size can coincide with the first trace's) and the two graphs'
code is compared. Equal code: the graph holds no shape-derived constant and is shared by every block of the kind.
Different code: the kind is traced per shape, as before. Sizes 0 and 1 stay in the key (code may specialise on
them, as PyTorch's own symbolic shapes do), and so do kernel sizes, ranks, dtype and the pre-activation variant.

Example:
    >>> import torch
    >>> from lwcompile.config import Config
    >>> from lwcompile.ir import Block
    >>> attrs = (("dilation", (1, 1)), ("groups", 1), ("padding", (1, 1)), ("stride", (1, 1)))
    >>> a = Block("a", "a", "conv2d", attrs, "relu", (), "a.weight", None, (8, 4, 3, 3), None, (2, 4, 6, 6), (2, 8, 6, 6), 1)
    >>> b = Block("b", "b", "conv2d", attrs, "relu", (), "b.weight", None, (16, 8, 3, 3), None, (2, 8, 5, 5), (2, 16, 5, 5), 1)
    >>> shared = SharedInnerGraphs(Config())
    >>> ga = shared.get(a, torch.float32, a.input_shape, a.output_shape, False)
    >>> shared.get(b, torch.float32, b.input_shape, b.output_shape, False) is ga, shared.traces
    (True, 2)
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from lwcompile.config import Config
from lwcompile.ir import Block
from lwcompile.passes.exact_solver import EXACT
from lwcompile.passes.inner import build_inner_graph, inner_example
from lwcompile.passes.linear_ops import LINEAR_OPS

SHARED_OPS = ("conv1d", "conv2d", "conv3d")  # x (N, C, *S), W (O, C, *k): the layouts sentinel_block knows
_PRIMES = (10007, 10009, 10037, 10039, 10061, 10067, 10069, 10079)  # N, C, O, then spatial sizes


def _small(shape: tuple[int, ...]) -> tuple[int | None, ...]:
    return tuple(d if d in (0, 1) else None for d in shape)


def share_key(block: Block, config: Config, xs: tuple, ts: tuple, dtype: torch.dtype, preact: bool) -> tuple | None:
    """The kind of the block's inner graph with sizes left out (None: traced per shape). The exact solver's graph
    names its block in its run-time errors and holds shape-sized identities, so it is never shared."""
    attrs = dict(block.attrs)
    if config.inner_optimizer == EXACT or block.op not in SHARED_OPS or attrs.get("groups", 1) != 1:
        return None
    frozen = tuple(p in block.frozen for p in block.params)
    return (block.op, repr(block.attrs), block.transfer, repr(block.transfer_kwargs), tuple(block.weight_shape[2:]),
            block.bias_shape is not None, frozen, _small(xs), _small(ts), _small(block.weight_shape[:2]), dtype,
            preact)


def sentinel_block(block: Block, xs: tuple) -> Block:
    """``block`` with every size above 1 of its input and weight replaced by a distinct large prime (kernel sizes
    kept)."""
    n, c, *space = xs
    o = block.weight_shape[0]
    pick = lambda d, p: d if d in (0, 1) else p  # noqa: E731
    x = (pick(n, _PRIMES[0]), pick(c, _PRIMES[1]), *(pick(d, p) for d, p in zip(space, _PRIMES[3:])))
    w = (pick(o, _PRIMES[2]), x[1], *block.weight_shape[2:])
    bias = None if block.bias_shape is None else (w[0],)
    with torch.device("meta"):
        z = LINEAR_OPS[block.op].apply(torch.empty(x), torch.empty(w), None if bias is None else torch.empty(bias),
                                       dict(block.attrs))
    return dataclasses.replace(block, weight_shape=w, bias_shape=bias, input_shape=x, output_shape=tuple(z.shape))


@dataclasses.dataclass
class _Kind:
    graph: fx.GraphModule
    shapes: tuple  # (weight shape, x shape, target shape) it was traced for
    shared: bool | None = None  # None: not checked yet


class SharedInnerGraphs:
    """Inner graphs by kind (:func:`share_key`); ``get`` returns the graph a block runs in ``step``. ``traces``
    counts the make_fx traces made (including sentinel checks); ``trace`` (default: :func:`build_inner_graph`)
    traces one block for one set of shapes."""

    def __init__(self, config: Config,
                 trace: Callable[[Block, torch.dtype, tuple, tuple, bool, bool], fx.GraphModule] | None = None) -> None:
        self.config = config
        self._trace = trace if trace is not None else self._default_trace
        self._kinds: dict[tuple, _Kind] = {}
        self.traces = 0

    def _default_trace(self, block: Block, dtype: torch.dtype, xs: tuple, ts: tuple, preact: bool,
                       offset: bool = True) -> fx.GraphModule:
        # fake example tensors: the sentinel sizes would not fit in memory, and make_fx reads shapes only
        with FakeTensorMode():
            ex = inner_example(block, self.config, dtype=dtype, x_shape=tuple(xs), target_shape=tuple(ts),
                               preact=preact)
        return build_inner_graph(block, self.config, ex, preact=preact, offset=offset)

    def traced(self, block: Block, dtype: torch.dtype, xs: tuple, ts: tuple, preact: bool,
               offset: bool = True) -> fx.GraphModule:
        self.traces += 1
        return self._trace(block, dtype, xs, ts, preact, offset)

    def get(self, block: Block, dtype: torch.dtype, xs: tuple, ts: tuple, preact: bool,
            own: Callable[[], fx.GraphModule] | None = None, offset: bool = True) -> fx.GraphModule:
        """The graph for ``block`` at these shapes; ``own()`` (default: a fresh trace) gives the block's per-shape
        graph where the kind is not shared. ``offset``: the variant taking the target's offset (what step runs)."""
        own = own if own is not None else (lambda: self.traced(block, dtype, xs, ts, preact, offset))
        key = share_key(block, self.config, tuple(xs), tuple(ts), dtype, preact)
        key = None if key is None else (*key, bool(offset))
        if key is None:
            return own()
        shapes = (tuple(block.weight_shape), tuple(xs), tuple(ts))
        kind = self._kinds.get(key)
        if kind is None:
            self._kinds[key] = _Kind(own(), shapes)
            return self._kinds[key].graph
        if kind.shapes == shapes or kind.shared:
            return kind.graph
        if kind.shared is None:
            kind.shared = self._check(block, dtype, xs, ts, preact, kind.graph, offset)
        return kind.graph if kind.shared else own()

    def _check(self, block: Block, dtype: torch.dtype, xs: tuple, ts: tuple, preact: bool,
               graph: fx.GraphModule, offset: bool = True) -> bool:
        probe = sentinel_block(block, tuple(xs))
        if _small(probe.output_shape) != _small(tuple(ts)):
            return False
        other = self.traced(probe, dtype, probe.input_shape, probe.output_shape, preact, offset)
        return other.code == graph.code
