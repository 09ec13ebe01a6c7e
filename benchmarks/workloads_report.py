"""What ``benchmarks/workloads.py`` reports: ratios to Adam's best of grid, the issue's goals, the markdown table and
the loss-against-seconds plots, from its results (plain dicts, as written to ``results.json``).

Example:
    >>> runs = [{"family": "adam", "diverged": False, "clock_s": 9.0, "to_1": {"steps": 5, "s": 4.0}},
    ...         {"family": "adam", "diverged": False, "clock_s": 9.0, "to_1": None},
    ...         {"family": "lwcompile", "diverged": False, "clock_s": 9.0, "to_1": {"steps": 2, "s": 2.0}}]
    >>> adam_best(runs, 1.0), ratio(runs[2], runs, 1.0)
    ((4.0, '='), {'value': 0.5, 'bound': '='})
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

GOAL_A_RATIO, GOAL_B_RATIO = 1.0, 0.7


def adam_best(runs: Sequence[dict[str, Any]], t: float, family: str = "adam") -> tuple[float, str]:
    """Adam's best-of-grid seconds to loss ``t``: (the lowest time of a grid lr, "="), or, when no lr reached it,
    (the shortest clock of the lrs that did not diverge, ">": Adam's time is more than that; inf if all did)."""
    grid = [r for r in runs if r["family"] == family]
    hits = [r[f"to_{t:g}"]["s"] for r in grid if r[f"to_{t:g}"]]
    if hits:
        return min(hits), "="
    alive = [r["clock_s"] for r in grid if not r["diverged"]]
    return (min(alive) if alive else math.inf), ">"


def ratio(rec: dict[str, Any], runs: Sequence[dict[str, Any]], t: float) -> dict[str, Any] | None:
    """``rec``'s seconds to ``t`` over Adam's best of grid: {"value", "bound": "=" or "<" (an upper bound, when
    Adam did not get there)}; None when ``rec`` did not reach ``t`` or no Adam ran."""
    hit = rec[f"to_{t:g}"]
    if not hit or not any(r["family"] == "adam" for r in runs):
        return None
    best, how = adam_best(runs, t)
    return {"value": hit["s"] / best if best > 0 else math.inf, "bound": "=" if how == "=" else "<"}


def _max_ratio(rec: dict[str, Any], runs: Sequence[dict[str, Any]], targets: Sequence[float]) -> dict | None:
    rs = [ratio(rec, runs, t) for t in targets]
    if any(r is None for r in rs) or not rs:
        return None
    worst = max(rs, key=lambda r: r["value"])
    return {"value": worst["value"], "bound": "<" if all(r["bound"] == "<" for r in rs) else worst["bound"]}


def _before(rec: dict[str, Any], runs: Sequence[dict[str, Any]], t: float, family: str) -> bool | None:
    """Whether ``rec`` reached ``t`` before the ``family`` run did (or it never did in a longer clock, or
    diverged); None when no such run exists."""
    other = next((r for r in runs if r["family"] == family), None)
    mine = rec[f"to_{t:g}"]
    if other is None:
        return None
    if not mine:
        return False
    theirs = other[f"to_{t:g}"]
    if theirs:
        return mine["s"] < theirs["s"]
    return other["diverged"] or mine["s"] <= other["clock_s"]


def goals(workloads: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals: (a) ``Config()`` never stalls (diverges, or ends no lower than it started) and reaches
    every target in <= 1.0x Adam's best-of-grid time on >= 3 of 4 workloads (of n run: ceil(0.75 n)); (b) one
    recipe reaches every target in <= 0.7x Adam's best of grid and before SOAP on every workload."""
    per_a: dict[str, Any] = {}
    recipes: dict[str, dict[str, Any]] = {}
    for w, wr in workloads.items():
        runs, targets = wr["runs"], wr["targets"]
        for r in runs:
            ratios = {f"{t:g}": ratio(r, runs, t) for t in targets}
            r["ratios"] = ratios
        d = next((r for r in runs if r["name"] == "defaults"), None)
        if d is not None:
            mr = _max_ratio(d, runs, targets)
            stalled = d["diverged"] or not d["final_loss"] < d["init_loss"]
            per_a[w] = {"max_ratio": mr, "stalled": stalled,
                        "ok": mr is not None and mr["value"] <= GOAL_A_RATIO and not stalled}
        for r in runs:
            if r["family"] != "lwcompile" or r["name"] == "defaults":
                continue
            mr = _max_ratio(r, runs, targets)
            soap = [_before(r, runs, t, "soap") for t in targets]
            before = None if any(s is None for s in soap) else all(soap)
            recipes.setdefault(r["name"], {})[w] = {
                "max_ratio": mr, "before_soap": before,
                "ok": mr is not None and mr["value"] <= GOAL_B_RATIO and before is not False}
    n = len(workloads)
    need = math.ceil(0.75 * n)
    a = {"needed": need, "per_workload": per_a,
         "met": (len(per_a) == n and sum(v["ok"] for v in per_a.values()) >= need
                 and not any(v["stalled"] for v in per_a.values()))}

    def score(name: str) -> tuple[int, float]:
        rows = recipes[name].values()
        return (sum(v["ok"] for v in rows),
                -sum(v["max_ratio"]["value"] if v["max_ratio"] else math.inf for v in rows))
    best = max(recipes, key=score) if recipes else None
    b = {"per_recipe": recipes, "best": best,
         "met": best is not None and len(recipes[best]) == n and all(
             v["ok"] and v["before_soap"] for v in recipes[best].values())}
    return {"a": a, "b": b}


def _ratio_text(r: dict[str, Any] | None) -> str:
    if r is None:
        return "—"
    return f"{'<' if r['bound'] == '<' else ''}{r['value']:.2f}×"


def _run_row(r: dict[str, Any], targets: Sequence[float]) -> str:
    cells = []
    for t in targets:
        hit = r[f"to_{t:g}"]
        cells.append(f"{hit['steps']} / {hit['s']:.1f} ({_ratio_text(r['ratios'][f'{t:g}'])})" if hit else "—")
    split = " / ".join(f"{1e3 * v:.1f}" for v in r["split_s"].values())
    mem = (f"{r['peak_bytes'] / 2 ** 20:.1f} ({r['peak_vs_adam']:.2f}×)" if r.get("peak_vs_adam") else
           f"{r['peak_bytes'] / 2 ** 20:.1f}" if r["peak_bytes"] else "—")
    return (f"| {r['name']} | {r['setting']} | {' | '.join(cells)} | {1e3 * r['median_step_s']:.1f} | {split} | "
            f"{mem} | {r['final_loss']:.4g}{' (diverged)' if r['diverged'] else ''} |")


def format_markdown(res: dict[str, Any]) -> str:
    budgets = res.get("budgets") or {w: res["budget_s"] for w in res["workloads"]}
    every = (f"every {res['eval_steps']} steps" if res["eval_steps"]
             else f"every {100 * res['eval_frac']:g} % of the budget")
    budget_text = (f"{res['budget_s']:g} s" if len(set(budgets.values())) <= 1
                   else ", ".join(f"{w} {b:g} s" for w, b in budgets.items()))
    lines = ["# Workloads: time to train-loss targets, lwcompile against backprop optimizers", "",
             f"CPU: {res['cpu']}, {res['threads']} torch thread(s), torch {res['torch']}. Budget "
             f"{budget_text} of clocked training per method per workload; the methods step in turn "
             "(round robin), from the same init and on the same batches; the clock is each method's own step time. "
             f"Train loss on each workload's fixed subset, evaluated off the clock {every} and when a run stops "
             "(budget, divergence, or below the tightest target): a time to a target is the first evaluation at or "
             "below it. Seconds are ratios within this run only" + (" (--quick: tiny budgets, digits data)."
                                                                   if res["quick"] else "."), "",
             "Cells: steps / seconds to the target (its ratio to Adam's best of grid; `<` = Adam did not reach it, "
             "the ratio is against Adam's clock, an upper bound); — = not reached. Split of the median step (ms): "
             "target graph / inner phase / rest for lwcompile, forward+backward / optimizer step / rest for "
             "backprop. Peak: the most tensor memory alive during a run's second step, everything the run "
             "allocated counted, data excluded (MiB; its ratio to Adam's).", ""]
    for w, wr in res["workloads"].items():
        targets = wr["targets"]
        lines += [f"## {w} ({wr['data']})", "", f"{wr['description']}; batch {wr['batch_size']}, {wr['n_train']} "
                  f"training rows, loss on {wr['n_eval']} fixed rows. Initial loss "
                  f"{wr['runs'][0]['init_loss']:.4g}." if wr["runs"] else "no method ran.", "",
                  "| method | setting | " + " | ".join(f"to {t:g}" for t in targets)
                  + " | median step (ms) | split (ms) | peak MiB | final loss |",
                  "| --- | --- | " + " | ".join("---:" for _ in targets) + " | ---: | ---: | ---: | ---: |"]
        lines += [_run_row(r, targets) for r in wr["runs"]]
        lines += ["", f"![loss against seconds](loss_vs_seconds_{w}.png)", ""]
    g = res["goals"]
    lines += ["## Goals", "", f"(a) `Config()` never stalls and reaches every target in <= {GOAL_A_RATIO:g}× "
              f"Adam's best-of-grid time on >= {g['a']['needed']} of {len(res['workloads'])} workloads: "
              f"**{'met' if g['a']['met'] else 'not met'}**."]
    for w, v in g["a"]["per_workload"].items():
        lines.append(f"- {w}: worst ratio {_ratio_text(v['max_ratio'])}"
                     + (", stalled" if v["stalled"] else "") + (" — ok" if v["ok"] else ""))
    lines += ["", f"(b) the best recipe reaches every target in <= {GOAL_B_RATIO:g}× Adam's best of grid and before "
              f"SOAP on all workloads: **{'met' if g['b']['met'] else 'not met'}**"
              + (f" (best recipe: `{g['b']['best']}`)." if g["b"]["best"] else " (no recipe ran).")]
    for name, rows in g["b"]["per_recipe"].items():
        cells = [f"{w} {_ratio_text(v['max_ratio'])}"
                 f"{'' if v['before_soap'] is None else ', before SOAP' if v['before_soap'] else ', not before SOAP'}"
                 f"{' — ok' if v['ok'] else ''}" for w, v in rows.items()]
        lines.append(f"- `{name}` ({res['recipes'].get(name, '')}): " + "; ".join(cells))
    lines += ["", "Compile (tracing) time, off the clock: " + "; ".join(
        f"{w} " + ", ".join(f"{r['name']} {r['compile_s']:.1f} s" for r in wr["runs"] if r["family"] == "lwcompile")
        for w, wr in res["workloads"].items()) + "."]
    lines += [""] + [f"Note: {n}" for n in res["notes"]] + ["", f"Total benchmark time {res['total_s']:.0f} s.", ""]
    return "\n".join(lines)


def plot_workload(res: dict[str, Any], w: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wr = res["workloads"][w]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in wr["runs"]:
        ev = [(c, loss) for _, c, loss in r["evals"] if math.isfinite(loss) and loss > 0]
        ax.plot([c for c, _ in ev], [loss for _, loss in ev], "-" if r["family"] == "lwcompile" else "--",
                label=f"{r['name']} ({r['setting'][:40]})")
    for t in wr["targets"]:
        ax.axhline(t, color="grey", lw=0.6)
    ax.set_xlabel("clocked training seconds (evaluation excluded)")
    ax.set_ylabel(f"train loss ({wr['n_eval']} fixed rows)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"{w} ({wr['data']}), {res['cpu'][:60]}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
