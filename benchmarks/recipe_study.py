"""Study: train loss after a fixed compute budget vs T, γ, the proximal λ, the inner optimizer and its schedule.

Every recipe trains the paper's MNIST autoencoder from the same init on the same batches for ``--budget-s`` seconds
of clocked training (evaluation and compiling excluded), with the loss evaluated on the same fixed 10,000 training
images as ``benchmarks/time_to_target.py``. ``--clock cpu`` counts the process's CPU time instead of wall-clock
(use it with ``--threads 1`` when other jobs share the machine: CPU time is far less sensitive to them).

    python benchmarks/recipe_study.py --threads 1 --clock cpu --budget-s 60 --out docs/results/study
    python benchmarks/recipe_study.py --recipes exact-g300-l30,defaults --budget-s 20

Writes ``study.md``, ``study.json`` and ``study.png`` (loss vs clocked seconds) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lwcompile import Config  # noqa: E402
from lwcompile.experiments.data import load_images  # noqa: E402
from lwcompile.experiments.models import AUTOENCODER_SIZES  # noqa: E402
from time_to_target import cpu_name, describe, make_backprop, make_lwcompile, make_peer  # noqa: E402

_S = dict(target="gd_pre", local_loss="squared_pre")
_M = dict(steps=10, gamma=10.0, inner_lr=1e-5, momentum=0.999)  # LocoProp-M as in the paper; today's Config() is "M-T3-g30-lr1e-4"


def _m(**changes) -> Config:
    return Config(**{**_M, **changes})


STUDY: dict[str, Config] = {
    # LocoProp-M: the paper's T = 10, γ = 10, inner lr 1e-5 (the defaults when the study ran) and variations
    "paper-M": _m(),
    "M-T1": _m(steps=1),
    "M-T3": _m(steps=3),
    "M-T10-decay": _m(inner_lr_decay=True),
    "M-T10-lr3e-5": _m(inner_lr=3e-5),
    "M-T3-lr3e-5": _m(steps=3, inner_lr=3e-5),
    "M-T3-lr1e-4": _m(steps=3, inner_lr=1e-4),
    "M-T1-lr1e-4": _m(steps=1, inner_lr=1e-4),
    "M-g30": _m(gamma=30.0),
    "M-g100": _m(gamma=100.0),
    "M-T3-g30": _m(steps=3, gamma=30.0),
    "M-T3-g30-lr3e-5": _m(steps=3, gamma=30.0, inner_lr=3e-5),
    "M-T3-g30-lr1e-4": _m(steps=3, gamma=30.0, inner_lr=1e-4),
    # LocoProp-S, iterative inner optimizers
    "S-rmsprop_tf1-T10": Config(**_S, steps=10, gamma=10.0, inner_lr=1e-5),
    "S-adam-T3": Config(**_S, inner_optimizer="adam", steps=3, gamma=10.0, inner_lr=1e-4),
    # LocoProp-S, exact inner solve: γ and λ
    "exact-g100-l10": Config(**_S, inner_optimizer="exact", gamma=100.0, prox=10.0),
    "exact-g300-l30": Config(**_S, inner_optimizer="exact", gamma=300.0, prox=30.0),
    "exact-g300-l100": Config(**_S, inner_optimizer="exact", gamma=300.0, prox=100.0),
    "exact-g300-l10": Config(**_S, inner_optimizer="exact", gamma=300.0, prox=10.0),
    "exact-g300-l20": Config(**_S, inner_optimizer="exact", gamma=300.0, prox=20.0),
    "exact-g200-l20": Config(**_S, inner_optimizer="exact", gamma=200.0, prox=20.0),
    "exact-g500-l50": Config(**_S, inner_optimizer="exact", gamma=500.0, prox=50.0),
    "exact-g1000-l30": Config(**_S, inner_optimizer="exact", gamma=1000.0, prox=30.0),
    "exact-g1000-l100": Config(**_S, inner_optimizer="exact", gamma=1000.0, prox=100.0),
    "exact-g3000-l300": Config(**_S, inner_optimizer="exact", gamma=3000.0, prox=300.0),
}


BACKPROP = {"adam-lr1e-3": ("adam", 1e-3), "adam-lr3e-3": ("adam", 3e-3)}  # reference rows


def run_study(names: Sequence[str], x_train: torch.Tensor, x_eval: torch.Tensor, budget_s: float, clock: str,
              eval_every: float, seed: int = 0, out: Path | None = None) -> dict[str, Any]:
    tick = time.process_time if clock == "cpu" else time.perf_counter
    res: dict[str, Any] = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "clock": clock,
                           "budget_s": budget_s, "n_eval": int(x_eval.shape[0]), "runs": []}
    for name in names:
        if name == "peer":
            r = make_peer(AUTOENCODER_SIZES, x_train, 1000, seed, clock=tick)
            if r is None:
                print("peer skipped: `locoprop` is not installed (pip install --no-deps locoprop)")
                continue
        elif name in BACKPROP:
            r = make_backprop(*BACKPROP[name], AUTOENCODER_SIZES, x_train, 1000, seed, clock=tick)
        else:
            r = make_lwcompile(name, STUDY[name], AUTOENCODER_SIZES, x_train, 1000, seed, clock=tick)
        r.train(x_eval, budget_s, -math.inf, eval_every)
        rec = {"name": name, "setting": describe(STUDY[name]) if name in STUDY else r.setting, "steps": r.steps,
               "clock_s": r.clock,
               "final_loss": r.evals[-1][2], "diverged": r.diverged, "evals": r.evals,
               "median_step_s": sorted(r.step_times)[len(r.step_times) // 2] if r.step_times else float("nan")}
        res["runs"].append(rec)
        print(f"{name}: {r.steps} steps, {r.clock:.1f} s, loss {rec['final_loss']:.2f}", flush=True)
        if out is not None:  # partial results survive an interrupted study
            (out / "study.json").write_text(json.dumps(res, indent=1))
    return res


def loss_at_step(evals: Sequence[Sequence[float]], step: int) -> float:
    """The eval loss at ``step``, interpolated log-linearly between the evaluations around it (nan past the end).

    >>> round(loss_at_step([(0, 0.0, 100.0), (10, 1.0, 10.0)], 5), 3)
    31.623
    """
    for (s0, _, l0), (s1, _, l1) in zip(evals, evals[1:]):
        if s0 <= step <= s1 and l0 > 0 and l1 > 0:
            w = (step - s0) / max(s1 - s0, 1)
            return math.exp((1 - w) * math.log(l0) + w * math.log(l1))
    return float("nan")


def format_markdown(res: dict[str, Any], at_steps: Sequence[int] = (20, 60)) -> str:
    cols = " | ".join(f"loss at step {k}" for k in at_steps)
    lines = [f"CPU: {res['cpu']}, {res['threads']} torch thread(s); clock: {res['clock']} time; budget "
             f"{res['budget_s']:g} s per recipe; loss on {res['n_eval']} fixed training images.", "",
             f"| recipe | Config | steps | median step (s) | loss at budget | {cols} |",
             "| --- | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in at_steps) + " |"]
    for r in sorted(res["runs"], key=lambda r: (not math.isfinite(r["final_loss"]), r["final_loss"])):
        at = " | ".join(f"{loss_at_step(r['evals'], k):.1f}" for k in at_steps).replace("nan", "—")
        lines.append(f"| {r['name']} | `{r['setting']}` | {r['steps']} | {r['median_step_s']:.3f} | "
                     f"{r['final_loss']:.2f}{' (diverged)' if r['diverged'] else ''} | {at} |")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in res["runs"]:
        ev = [(c, loss) for _, c, loss in r["evals"] if math.isfinite(loss)]
        ax.plot([c for c, _ in ev], [loss for _, loss in ev], "-" if r["name"].startswith("exact") else (":" if r["name"] in BACKPROP or r["name"] == "peer" else "--"),
                label=r["name"])
    ax.set_xlabel(f"clocked training seconds ({res['clock']} time, {res['threads']} thread(s))")
    ax.set_ylabel(f"train loss ({res['n_eval']} fixed images)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="auto")
    p.add_argument("--recipes", default=",".join(STUDY), help=f"comma-separated: {', '.join(STUDY)}")
    p.add_argument("--budget-s", type=float, default=60.0)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--eval-every", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/recipe-study"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    x_train, name = load_images(a.data_dir, "train")
    if name != "mnist":
        p.error("the study needs MNIST: pass --data-dir (e.g. ../shared/data/mnist)")
    g = torch.Generator().manual_seed(0)
    x_eval = x_train[torch.randperm(x_train.shape[0], generator=g)[:10_000]]
    names = [n.strip() for n in a.recipes.split(",") if n.strip()]
    for n in names:
        if n not in STUDY and n not in BACKPROP and n != "peer":
            p.error(f"unknown recipe {n!r}; choose from {', '.join([*STUDY, *BACKPROP, 'peer'])}")
    a.out.mkdir(parents=True, exist_ok=True)
    res = run_study(names, x_train, x_eval, a.budget_s, a.clock, a.eval_every, out=a.out)
    md = format_markdown(res)
    (a.out / "study.md").write_text(md)
    (a.out / "study.json").write_text(json.dumps(res, indent=1))
    plot(res, a.out / "study.png")
    print(md)
    return res


if __name__ == "__main__":
    main()
