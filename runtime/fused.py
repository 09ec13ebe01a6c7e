"""Running fused groups: the jobs of identical blocks become one job over stacked arguments.

The fuse pass (:mod:`lwcompile.passes.fuse`) names groups of blocks that share one inner graph. Each step,
:func:`run_fused` looks at the jobs actually handed to it and fuses the members of a group that really do run the same
graph object on arguments of the same shapes, dtypes and devices, on the same device of the assignment; the rest run
alone, as before. A fused job stacks every member's arguments along a new first axis (an argument all members share,
the lr tensor, is passed once), runs the batched graph (one launch per op instead of N) and hands each member a view
of its row of every output, so :meth:`Program.commit` sees exactly the per-block results it always did.

Placement: a plan assigns *blocks* to devices (the cost model and ``profile_blocks`` price each block alone), and a
fused group is a job that can still be split: its members on one device fuse, members the plan put on other devices
fuse there among themselves (or run alone). So every assignment still runs, and a group is never moved to a device
the plan did not choose. The distributed runtimes and ONNX export never come here: they run every block's own graph.

A group whose graph vmap cannot batch (an op without a batching rule) runs unfused, warned once, and the reason is
kept in :attr:`FusedCache.notes` (``prog.fusion.notes``).

Example:
    >>> import torch
    >>> from lwcompile.passes.fuse import FusedGroups
    >>> g = torch.fx.symbolic_trace(lambda w, x, lr: (w - lr * x,))
    >>> jobs = {n: (g, (torch.ones(2), torch.full((2,), float(i)), torch.tensor(0.5))) for i, n in enumerate("abc")}
    >>> lr = jobs["a"][1][2]
    >>> jobs = {n: (f, (w, x, lr)) for n, (f, (w, x, _)) in jobs.items()}  # one lr tensor for all, as inner_jobs does
    >>> out = run_fused(jobs, FusedGroups((("a", "b", "c"),)), cache=FusedCache())
    >>> out["c"][0]
    tensor([0., 0.])
"""
from __future__ import annotations

import threading
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx

from lwcompile.errors import first_line
from lwcompile.passes.fuse import FusedGroups, batched_graph
from lwcompile.runtime.local import Job, _check, check_runnable, run_jobs

Wrap = Callable[[str, fx.GraphModule], Callable[..., Any]]  # (job name, batched graph) -> what runs it


class FusedCache:
    """One program's batched graphs, traced once per (shared graph, members, argument shapes); and the refusals."""

    def __init__(self, wrap: Wrap | None = None) -> None:
        self.wrap = wrap  # e.g. Config.compile_inner's torch.compile wrapper
        self.notes: list[str] = []
        self._graphs: dict[tuple, tuple[fx.GraphModule, Callable[..., Any] | None]] = {}
        self._lock = threading.Lock()

    def batched(self, name: str, gm: fx.GraphModule, args: Sequence[Any], n: int,
                in_dims: tuple[int | None, ...]) -> Callable[..., Any] | None:
        """The callable running ``gm`` over ``n`` stacked argument lists, or None when vmap cannot batch ``gm``."""
        key = (id(gm), n, in_dims, _arg_key(args))
        with self._lock:
            hit = self._graphs.get(key)
            if hit is not None and hit[0] is gm:  # gm kept alive in the value: its id is not reused
                return hit[1]
        example = [a if d is None else torch.empty((n, *a.shape), dtype=a.dtype, device=a.device)
                   for a, d in zip(args, in_dims)]
        fn: Callable[..., Any] | None
        try:
            bg = batched_graph(gm, example, in_dims)
            fn = self.wrap(name, bg) if self.wrap is not None else bg
        except Exception as e:  # noqa: BLE001  (fusion is an optimization: the members run unfused instead)
            fn = None
            note = f"{name} runs unfused: batching its inner graph failed ({first_line(e)})"
            with self._lock:
                self.notes.append(note)
            warnings.warn(f"Config.fuse: {note}", RuntimeWarning, stacklevel=3)
        with self._lock:
            self._graphs[key] = (gm, fn)
        return fn


class _FusedJob:
    """A fused job's callable: takes every member's arguments (flat), stacks them, runs the batched graph."""

    def __init__(self, fn: Callable[..., Any], n: int, in_dims: tuple[int | None, ...]) -> None:
        self.fn, self.n, self.in_dims = fn, n, in_dims

    def __call__(self, *flat: Any) -> tuple:
        k = len(self.in_dims)
        stacked = [flat[i] if d is None else _stack([flat[m * k + i] for m in range(self.n)])
                   for i, d in enumerate(self.in_dims)]
        return tuple(self.fn(*stacked))


def _stack(ts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(ts)``, without the copy when ``ts`` are consecutive rows of one tensor already, in order: a fused
    job's outputs are handed out as such rows, so the optimizer state it kept comes back to the next step as one."""
    t0 = ts[0]
    if t0._base is not None and t0.is_contiguous():
        ptr, step = t0.untyped_storage().data_ptr(), t0.numel() * t0.element_size()
        if all(t.shape == t0.shape and t.dtype == t0.dtype and t.is_contiguous() and t._base is not None
               and t.untyped_storage().data_ptr() == ptr and t.data_ptr() == t0.data_ptr() + i * step
               for i, t in enumerate(ts)):
            return t0.as_strided((len(ts), *t0.shape), (t0.numel(), *t0.stride()), t0.storage_offset())
    return torch.stack(ts)


def _graph_of(fn: Any) -> fx.GraphModule | None:
    """The GraphModule a job runs (directly, or wrapped by Config.compile_inner's CompiledGraph)."""
    g = fn if isinstance(fn, fx.GraphModule) else getattr(fn, "graph", None)
    return g if isinstance(g, fx.GraphModule) else None


def _arg_key(args: Sequence[Any]) -> tuple:
    return tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else ("value", id(a))
                 for a in args)


def fuse_jobs(jobs: Mapping[str, Job], fused: FusedGroups, assignment: Mapping[str, Sequence[str]] | None,
              cache: FusedCache) -> tuple[dict[str, Job], dict[str, list[str]] | None, dict[str, tuple[str, ...]]]:
    """(jobs with each fusable set of members replaced by one fused job, the assignment rewritten alike,
    fused job name -> its members). The fused job takes the first member's place in the order."""
    device_of = {n: d for d, names in (assignment or {}).items() for n in names}
    replaced: dict[str, tuple[str, tuple[str, ...]]] = {}  # member -> (fused job name, members)
    new_jobs: dict[str, Job] = {}
    members_of: dict[str, tuple[str, ...]] = {}
    for group in fused.groups:
        sets: dict[tuple, list[str]] = {}
        for n in group:
            if n in jobs and _graph_of(jobs[n][0]) is not None:
                gm = _graph_of(jobs[n][0])
                sets.setdefault((device_of.get(n), id(gm), _arg_key(jobs[n][1])), []).append(n)
        for names in sets.values():
            if len(names) < 2:
                continue
            args0 = jobs[names[0]][1]
            in_dims = tuple(None if all(jobs[m][1][i] is a for m in names) else 0 for i, a in enumerate(args0))
            if any(d == 0 and not isinstance(a, torch.Tensor) for a, d in zip(args0, in_dims)):
                continue  # a non-tensor argument that differs between members: nothing to stack
            fname = f"fused[{', '.join(names)}]"
            fn = cache.batched(fname, _graph_of(jobs[names[0]][0]), args0, len(names), in_dims)
            if fn is None:
                continue
            flat = tuple(a for m in names for a in jobs[m][1])
            new_jobs[fname] = (_FusedJob(fn, len(names), in_dims), flat)
            members_of[fname] = tuple(names)
            for m in names:
                replaced[m] = (fname, tuple(names))
    out_jobs: dict[str, Job] = {}
    for n, job in jobs.items():
        if n not in replaced:
            out_jobs[n] = job
        elif replaced[n][1][0] == n:
            out_jobs[replaced[n][0]] = new_jobs[replaced[n][0]]
    new_assignment = None
    if assignment is not None:
        new_assignment = {d: [n if n not in replaced else replaced[n][0] for n in names
                              if n not in replaced or replaced[n][1][0] == n] for d, names in assignment.items()}
    return out_jobs, new_assignment, members_of


def run_fused(jobs: Mapping[str, Job], fused: FusedGroups, assignment: Mapping[str, Sequence[str]] | None = None,
              cache: FusedCache | None = None, run: Callable[..., dict[str, tuple]] = run_jobs) -> dict[str, tuple]:
    """:func:`~lwcompile.runtime.local.run_jobs` with the fusable members of ``fused``'s groups run as one job each;
    returns every block's own results (member ``i`` of a fused job gets row ``i`` of each output, a view)."""
    if assignment:  # the user's assignment is checked against the user's blocks, before anything is rewritten
        _check(jobs, assignment)
        check_runnable(assignment)
    cache = FusedCache() if cache is None else cache
    f_jobs, f_assignment, members_of = fuse_jobs(jobs, fused, assignment or None, cache)
    outs = run(f_jobs, f_assignment)
    results: dict[str, tuple] = {}
    for name, res in outs.items():
        members = members_of.get(name)
        if members is None:
            results[name] = res
            continue
        for i, m in enumerate(members):
            results[m] = tuple(o[i] for o in res)
    return {n: results[n] for n in jobs}
