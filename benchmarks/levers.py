"""Each speed lever on and off: median step and inner-phase time of one recipe, both programs in one run.

A lever is a set of Config fields that must not change the mathematics (only rounding, if anything). For every
(recipe, lever), two programs are built from the same init; they then take turns on the same batches (on, off,
on, off, ...), so both see the same machine load. Reported: median step seconds and median inner-phase seconds
(``prog.last_timings``) with the lever on and off, their ratios, and the largest relative difference of the
weights after the interleaved steps (the "same mathematics" check).

    python benchmarks/levers.py                     # MNIST autoencoder, defaults / paper-M / best, ~3 min
    python benchmarks/levers.py --quick             # digits, a few seconds
    python benchmarks/levers.py --recipes best --levers reuse_preactivation --steps 12
    python benchmarks/levers.py --recipes defaults,paper-M --levers compile_inner --steps 12   # opt-in lever

:func:`measure_levers` is what ``benchmarks/time_to_target.py`` calls for its on/off table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lwcompile  # noqa: E402
from bench_setup import load_autoencoder_data, setup_torch  # noqa: E402
from lwcompile.experiments.data import batches  # noqa: E402
from lwcompile.experiments.models import bce_sum, deep_autoencoder  # noqa: E402

# lever name -> (Config fields when on, when off)
LEVERS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "reuse_preactivation": ({"reuse_preactivation": True}, {"reuse_preactivation": False}),
}
# Measured only when named in --levers (not in time_to_target's table): torch.compile takes minutes for the
# autoencoder's blocks the first time (in the warm-up step, off the medians).
OPTIONAL_LEVERS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "compile_inner": ({"compile_inner": True}, {"compile_inner": False}),
}


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if s else float("nan")


def _program(cfg: lwcompile.Config, sizes: Sequence[int], example: torch.Tensor, seed: int
             ) -> tuple[lwcompile.Program, torch.nn.Module]:
    model = deep_autoencoder(sizes, seed=seed, output_sigmoid=True)
    prog = lwcompile.transform(model, bce_sum, (example,), cfg)
    return prog, model


def measure_lever(cfg: lwcompile.Config, on: Mapping[str, Any], off: Mapping[str, Any], x_train: torch.Tensor,
                  sizes: Sequence[int], batch_size: int, steps: int, seed: int = 0) -> dict[str, float]:
    """Median step / inner seconds of ``cfg`` with the fields ``on`` and with ``off``, interleaved on the same
    batches after one warm-up step each; ``max_rel_diff``: the weights' largest relative difference at the end."""
    stream = batches(x_train, batch_size, epoch=0, seed=seed)
    example = x_train[:batch_size]
    runs = {k: _program(cfg.replace(**fields), sizes, example, seed) for k, fields in (("on", on), ("off", off))}
    times: dict[str, dict[str, list[float]]] = {k: {"step": [], "inner": []} for k in runs}
    for i in range(steps + 1):
        xb = next(stream)
        for k, (prog, _) in (runs.items() if i % 2 == 0 else reversed(list(runs.items()))):
            t0 = time.perf_counter()
            prog.step(xb, xb)
            dt = time.perf_counter() - t0
            if i > 0:  # the first step traces the graphs for this batch
                times[k]["step"].append(dt)
                times[k]["inner"].append(prog.last_timings["inner"])
    diff = max(float(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).detach())
               for a, b in zip(runs["on"][1].parameters(), runs["off"][1].parameters()))
    out = {f"{k}_{w}_s": _median(times[k][w]) for k in runs for w in ("step", "inner")}
    out["step_ratio"] = out["on_step_s"] / out["off_step_s"]
    out["inner_ratio"] = out["on_inner_s"] / out["off_inner_s"]
    out["max_rel_diff"] = diff
    return out


def measure_levers(recipes: Mapping[str, lwcompile.Config], levers: Sequence[str], x_train: torch.Tensor,
                   sizes: Sequence[int], batch_size: int, steps: int, seed: int = 0,
                   log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One row per (recipe, lever): :func:`measure_lever`'s numbers plus the names."""
    rows = []
    for rname, cfg in recipes.items():
        for lever in levers:
            on, off = (LEVERS | OPTIONAL_LEVERS)[lever]
            row = {"recipe": rname, "lever": lever} | measure_lever(cfg, on, off, x_train, sizes, batch_size, steps,
                                                                   seed)
            log(f"  lever {lever} on {rname}: step {row['on_step_s']:.3f} s on / {row['off_step_s']:.3f} s off "
                f"({row['step_ratio']:.2f}), inner {row['on_inner_s']:.3f} / {row['off_inner_s']:.3f} "
                f"({row['inner_ratio']:.2f}), weights differ by {row['max_rel_diff']:.1e}")
            rows.append(row)
    return rows


def format_levers(rows: Sequence[Mapping[str, Any]], steps: int) -> list[str]:
    """The on/off table as markdown lines."""
    lines = ["| recipe | lever | step on (s) | step off (s) | on/off | inner on (s) | inner off (s) | on/off | "
             "weights' max rel. diff |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['lever']} | {r['on_step_s']:.3f} | {r['off_step_s']:.3f} | "
                     f"{r['step_ratio']:.2f} | {r['on_inner_s']:.3f} | {r['off_inner_s']:.3f} | {r['inner_ratio']:.2f} | "
                     f"{r['max_rel_diff']:.1e} |")
    lines += ["", f"Medians of {steps} steps per side, on and off taking turns on the same batches after one warm-up "
              "step each (same init)."]
    return lines


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    from time_to_target import RECIPES, cpu_name

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="auto", help="MNIST idx directory; 'auto' = ../shared/data/mnist if present")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated: {', '.join(RECIPES)}")
    p.add_argument("--levers", default=",".join(LEVERS),
                   help=f"comma-separated: {', '.join(LEVERS)} (default), {', '.join(OPTIONAL_LEVERS)}")
    p.add_argument("--steps", type=int, default=None, help="timed steps per side (default 8; quick 3)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="scikit-learn digits")
    a = p.parse_args(argv)
    setup_torch(a.threads)
    x_train, name, sizes, batch_size = load_autoencoder_data(a.data_dir, a.quick)
    steps = a.steps if a.steps is not None else (3 if a.quick else 8)
    recipes = {r: RECIPES[r] for r in a.recipes.split(",") if r}
    levers = [v for v in a.levers.split(",") if v]
    for v in levers:
        if v not in LEVERS | OPTIONAL_LEVERS:
            p.error(f"unknown lever {v!r}; choose from {', '.join(LEVERS | OPTIONAL_LEVERS)}")
    print(f"CPU: {cpu_name()}; torch threads {torch.get_num_threads()}; data {name}")
    rows = measure_levers(recipes, levers, x_train, sizes, batch_size, steps)
    print("\n".join(format_levers(rows, steps)))
    return rows


if __name__ == "__main__":
    main()
