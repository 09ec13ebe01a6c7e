"""Where a training step's peak memory goes: the MNIST CNN and the LM, Adam against Config() and the exact recipe.

Each method builds its model, takes one step (tracing, warm-up) and then a second step inside a
:class:`bench_setup.MemoryWindow` (PyTorch's allocator records, on CPU too); the peak is the most tensor memory alive
during that step, counting what was alive when the window opened (model, optimizer or program state). The step is
split into its phases (lwcompile: target graph, inner phase, commit; Adam: forward+backward, optimizer step) and
each phase's peak is given above what was alive when it began. What was alive is itemised by size:

* params: the model's parameters and buffers;
* optimizer state: Adam's moments; lwcompile's inner optimizer state and outer optimizer slots;
* kept for the inner phase: every block's input x, target and pre-activation (and the non-block gradients), the
  target graph's outputs, alive from the target graph to the end of the step;
* journal: what the rollback journal holds for an atomic step (buffer copies, the old weights it swapped out).

    .venv/bin/python benchmarks/memory.py                     # writes docs/results/memory/results.md
    .venv/bin/python benchmarks/memory.py --workloads cnn --quick
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lwcompile  # noqa: E402
from lwcompile import program as program_mod  # noqa: E402
from lwcompile.experiments.workloads import WORKLOADS  # noqa: E402
from bench_setup import MemoryWindow, setup_torch  # noqa: E402

EXACT = dict(target="gd_pre", local_loss="squared_pre", inner_optimizer="exact", gamma=500.0, prox=1.0,
             prox_relative=True)
# the last row: the exact recipe without keeping pre-activations for the inner phase (it recomputes Z = XWᵀ)
METHODS = {"adam": None, "Config()": {}, "exact": EXACT, "exact, reuse_preactivation=False":
           dict(EXACT, reuse_preactivation=False)}
MIB = 2 ** 20


def nbytes(tensors: Any) -> int:
    """Bytes of the distinct storages among ``tensors`` (nested dicts/lists/tuples of tensors)."""
    seen: dict[int, int] = {}

    def walk(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            s = v.untyped_storage()
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        elif isinstance(v, dict):
            for u in v.values():
                walk(u)
        elif isinstance(v, (list, tuple)):
            for u in v:
                walk(u)
    walk(tensors)
    return sum(seen.values())


@contextlib.contextmanager
def _patched(obj: Any, name: str, wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, wrap(old))
    try:
        yield
    finally:
        setattr(obj, name, old)


def _in_region(mem: MemoryWindow, region: str, keep: dict | None = None, key: str = "") -> Callable:
    def wrap(f: Callable) -> Callable:
        def g(*a: Any, **k: Any) -> Any:
            with mem.region(region):
                out = f(*a, **k)
            if keep is not None:
                keep[key] = out
            return out
        return g
    return wrap


def measure(workload: str, method: str, data_dir: str | None) -> dict[str, Any]:
    """Peak bytes of one second step and its itemisation (see the module docstring)."""
    lw = WORKLOADS[workload].load(data_dir if data_dir else "auto")
    xb, yb = lw.batch(0)
    x2, y2 = lw.batch(1)
    row: dict[str, Any] = {"workload": workload, "method": method}
    # the window opens before the model is built: its parameters and the optimizer's state count, the data do not
    with MemoryWindow() as mem:
        model = lw.build(seed=0)
        row["params"] = nbytes(list(model.parameters()) + list(model.buffers()))
        if METHODS[method] is None:
            phases = ("forward+backward", "optimizer step")
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            for x, y, ctx in ((xb, yb, lambda n: contextlib.nullcontext()), (x2, y2, mem.region)):
                with ctx("step"):
                    opt.zero_grad(set_to_none=True)
                    with ctx("forward+backward"):
                        lw.loss_fn(model(x), y).backward()
                    with ctx("optimizer step"):
                        opt.step()
            row["optimizer state"] = nbytes([list(s.values()) for s in opt.state.values()])
        else:
            phases = ("target graph", "inner phase", "commit")
            prog = lwcompile.transform(model, lw.loss_fn, (xb,), lwcompile.Config(**METHODS[method]))
            prog.step(xb, yb)
            keep: dict[str, Any] = {}
            journals: list[Any] = []
            with _patched(prog, "compute_targets", _in_region(mem, "target graph", keep, "res")), \
                    _patched(program_mod, "run_jobs", _in_region(mem, "inner phase")), \
                    _patched(prog, "commit", _in_region(mem, "commit")), \
                    _patched(program_mod.rollback, "Journal",
                             lambda J: lambda *a, **k: journals.append(J(*a, **k)) or journals[-1]):
                with mem.region("step"):
                    prog.step(x2, y2)
            res = keep.pop("res")
            row["optimizer state"] = nbytes([list(prog._inner_state.values()), prog.outer_state()])
            row["kept for the inner phase"] = nbytes([res["inputs"], res["targets"], res["preacts"], res["grads"]])
            j = journals[-1]
            row["journal"] = nbytes([[b for _, b in j.buffers], [d for _, d in j.swapped],
                                     [c for _, c in j.outer_params]])
            del res, j, journals
    row["peak"] = mem.peak("step")
    for ph in phases:
        peak, before = mem.peak(ph), mem.live_before(ph)
        row[f"{ph} (above its start)"] = None if peak is None or before is None else peak - before
    return row


def table(rows: list[dict[str, Any]]) -> str:
    cols = ["peak", "x Adam", "params", "optimizer state", "kept for the inner phase", "journal",
            "forward+backward (above its start)", "optimizer step (above its start)",
            "target graph (above its start)", "inner phase (above its start)", "commit (above its start)"]
    adam = {r["workload"]: r["peak"] for r in rows if r["method"] == "adam"}
    out = ["| workload | method | " + " | ".join(cols) + " |", "| --- | --- |" + " --- |" * len(cols)]
    for r in rows:
        r = dict(r, **{"x Adam": (r["peak"] / adam[r["workload"]]) if adam.get(r["workload"]) else None})
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("" if v is None else f"{v:.2f}x" if c == "x Adam" else f"{v / MIB:.1f}")
        out.append(f"| {r['workload']} | {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=["cnn", "lm"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs/results/memory/results.md"))
    ap.add_argument("--quick", action="store_true", help="print the table, write nothing")
    a = ap.parse_args()
    setup_torch(1)
    torch.manual_seed(0)
    rows = [measure(w, m, a.data_dir) for w in a.workloads for m in a.methods]
    md = table(rows)
    print(md)
    if not a.quick:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("# Peak memory of one training step (MiB)\n\nMade by `.venv/bin/python benchmarks/memory.py` "
                       "(one thread; the second step of each method, MNIST CNN at batch 256, LM at batch 32; "
                       "exact = Config(" + ", ".join(f"{k}={v!r}" for k, v in EXACT.items()) + ")).\n\n"
                       + md + "\n")


if __name__ == "__main__":
    main()
