"""How a Program prints: its configuration and the block table (name, op, transfer, shape, bias, FLOPs).

Example:
    >>> import torch, lwcompile
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> print(describe(lwcompile.transform(m, torch.nn.functional.mse_loss, torch.randn(5, 3))).splitlines()[2])
      block  op      transfer  weight shape  bias  FLOPs/example
"""
from __future__ import annotations


def describe(prog) -> str:
    """The text ``print(prog)`` shows."""
    c = prog.config
    head = (f"lwcompile.Program({type(prog.model).__name__}, front end: {prog.frontend})\n"
            f"  target={c.target} local_loss={c.local_loss} gamma={c.gamma} T={c.steps} "
            f"inner={c.inner_optimizer}(lr={prog.inner_lr:g}) prox={c.prox} outer={c.outer_optimizer}(lr={c.outer_lr:g})\n")
    rows = [("block", "op", "transfer", "weight shape", "bias", "FLOPs/example")]
    for b in prog.blocks:
        tf = b.transfer + ("(" + ", ".join(f"{k}={v}" for k, v in b.transfer_kwargs) + ")" if b.transfer_kwargs else "")
        rows.append((b.name, b.op, tf, "x".join(map(str, b.weight_shape)), "yes" if b.bias else "no",
                     f"{b.flops_per_example:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  " + "  ".join(v.ljust(w) if i < 5 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  " + "  ".join("-" * w for w in widths))
    gm = prog.trace_result.graph_module
    n_nb = sum(gm.get_parameter(n).numel() for n in prog.nonblock)
    tail = (f"\n  {len(prog.blocks)} blocks; {len(prog.nonblock)} non-block parameter tensors ({n_nb:,} values) "
            "-> outer optimizer")
    notes = "".join(f"\n  note: {w}" for w in prog.warnings)
    return head + "\n".join(lines) + tail + notes
