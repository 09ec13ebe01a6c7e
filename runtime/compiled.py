"""Opt-in ``torch.compile`` of the inner-update graphs (``Config(compile_inner=True)``), with an eager fallback.

An inner graph is T unrolled optimizer iterations: a few matmuls and many element-wise ops (the optimizer's slot
updates, the local loss's residual), which eager PyTorch runs one kernel and one temporary at a time. Compiled
with inductor, the element-wise chains fuse into a few loops. The graphs are traced per shape and dtype already,
so each is compiled once (``dynamic=False``), lazily at its first call, and kept next to its GraphModule.

Compiling is an optimization, never a requirement: when compiling or a compiled call raises (no C compiler, an
op inductor cannot lower, a backend bug) and the plain GraphModule computes the result, the block runs eagerly
from then on, after one ``warnings.warn`` naming the block and the reason. The results are then the eager ones,
bit for bit. Inner graphs are pure functions (no input is mutated), so rerunning a job after a failed compiled
call is exact. An error the eager graph raises too (e.g. a singular exact solve) is the graph's own and is
raised unchanged, with no warning.

Example (``backend="eager"`` skips code generation, to keep the example fast):
    >>> import torch
    >>> gm = torch.fx.symbolic_trace(lambda w, x: (w - 0.1 * x * w,))
    >>> cache = CompiledGraphs(backend="eager")
    >>> fn = cache.get("fc", gm)
    >>> fn(torch.ones(3), torch.ones(3))[0]
    tensor([0.9000, 0.9000, 0.9000])
    >>> cache.get("fc", gm) is fn  # compiled once per graph
    True
"""
from __future__ import annotations

import threading
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx

from lwcompile.errors import first_line

# The torch.compile backend used when a CompiledGraphs names none: the seam tests replace to force a failure.
BACKEND: str | Callable[..., Any] = "inductor"


class CompiledGraphs:
    """One program's compiled inner graphs: ``get(block, graph)`` returns the callable that runs ``graph``.

    A block whose compilation failed once runs every graph (every shape) eagerly from then on, warned once.
    """

    def __init__(self, backend: str | Callable[..., Any] | None = None) -> None:
        self.backend = backend
        self.failed: dict[str, str] = {}  # block name -> why it runs eagerly
        self._fns: dict[int, tuple[fx.GraphModule, CompiledGraph]] = {}  # id(graph) -> (graph kept alive, callable)
        self._lock = threading.Lock()

    def get(self, block: str, graph: fx.GraphModule) -> CompiledGraph:
        with self._lock:  # blocks on simulated devices ask from several threads
            hit = self._fns.get(id(graph))
            if hit is None or hit[0] is not graph:
                hit = (graph, CompiledGraph(self, block, graph))
                self._fns[id(graph)] = hit
            return hit[1]

    def fail(self, block: str, error: BaseException) -> None:
        with self._lock:
            if block in self.failed:
                return
            self.failed[block] = first_line(_root_cause(error))
        warnings.warn(f"Config.compile_inner: block {block!r} runs its inner graph eagerly from now on: "
                      f"torch.compile failed ({self.failed[block]})", RuntimeWarning, stacklevel=2)


class CompiledGraph:
    """Runs one inner graph compiled (compiling at the first call), or eagerly once its block has failed."""

    def __init__(self, owner: CompiledGraphs, block: str, graph: fx.GraphModule) -> None:
        self.owner, self.block, self.graph = owner, block, graph
        self._fn: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        if self.block in self.owner.failed:
            return self.graph(*args)
        try:
            if self._fn is None:
                backend = self.owner.backend if self.owner.backend is not None else BACKEND
                self._fn = torch.compile(self.graph, backend=backend, dynamic=False, fullgraph=True)
            return self._fn(*args)
        except Exception as e:  # noqa: BLE001  (any failure of the optimization falls back)
            compiled_error = e
        out = self.graph(*args)  # outside the except: the graph's own error, if eager fails too, is raised alone
        self.owner.fail(self.block, compiled_error)
        return out


def _root_cause(error: BaseException) -> BaseException:
    """The first error of a chain: torch.compile wraps a backend's error (BackendCompilerFailed) and may raise a
    second one while handling a compiled call's (e.g. a custom op's wrong fake kernel); their first lines name
    neither cause."""
    seen = {id(error)}
    while True:
        nxt = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__
        if not isinstance(nxt, BaseException) or id(nxt) in seen:
            return error
        seen.add(id(nxt))
        error = nxt
