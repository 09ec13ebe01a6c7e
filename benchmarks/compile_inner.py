"""Benchmark: ``Config(compile_inner=True)`` on/off, seconds per step on the MNIST deep autoencoder.

For each recipe (``defaults``: ``Config()``; ``paper-M``: ``Config(steps=10, gamma=10.0, inner_lr=1e-5)``) two
programs start from the same init (the models and batches of ``benchmarks/time_to_target.py``, whose builders this
reuses; compiling happens there, off the clock) and take the same batches, their steps interleaved (which goes first
alternates) so that load from other processes hits both alike. After ``--warmup`` steps each, it reports the median
of ``--steps`` step times and of the inner phase alone (``prog.last_timings["inner"]``), the on/off ratios, and how
far the two runs' losses drifted apart (float rounding only).

    python benchmarks/compile_inner.py                    # MNIST (../shared/data/mnist), ~10 min on 2 cores
    python benchmarks/compile_inner.py --quick            # scikit-learn digits, ~2 min (mostly compiling)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from backprop_baselines import DIGITS_SIZES  # noqa: E402
from lwcompile.experiments.data import batches, load_images  # noqa: E402
from lwcompile.experiments.models import AUTOENCODER_SIZES  # noqa: E402
from time_to_target import RECIPES, cpu_name, make_lwcompile  # noqa: E402


def _median(xs: Sequence[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def measure(recipe: str, x_train: torch.Tensor, sizes: Sequence[int], batch_size: int, steps: int, warmup: int,
            seed: int = 0) -> dict[str, Any]:
    """Interleaved on/off step and inner-phase times of one recipe (medians over ``steps`` after ``warmup``)."""
    runs = {on: make_lwcompile(recipe, RECIPES[recipe].replace(compile_inner=on), sizes, x_train, batch_size, seed)
            for on in (False, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    inner: dict[bool, list[float]] = {False: [], True: []}
    losses: dict[bool, float] = {}
    stream = batches(x_train, batch_size, epoch=0, seed=seed)
    for i in range(warmup + steps):
        xb = next(stream)
        for on in ((False, True) if i % 2 == 0 else (True, False)):
            prog = runs[on].program
            t0 = time.perf_counter()
            losses[on] = prog.step(xb, xb)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[on].append(dt)
                inner[on].append(prog.last_timings["inner"])
    step = {on: _median(times[on]) for on in (False, True)}
    inn = {on: _median(inner[on]) for on in (False, True)}
    return {"recipe": recipe, "compile_s": runs[True].compile_s - runs[False].compile_s,
            "step_off": step[False], "step_on": step[True], "inner_off": inn[False], "inner_on": inn[True],
            "step_ratio": step[True] / step[False], "inner_ratio": inn[True] / inn[False],
            "loss_rel_diff": abs(losses[True] - losses[False]) / abs(losses[False])}


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="auto", help="MNIST idx directory; 'auto' = ../shared/data/mnist if present")
    p.add_argument("--recipes", default="defaults,paper-M")
    p.add_argument("--steps", type=int, default=12, help="measured steps per program (default 12)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1, help="measure every recipe this many times, in turn")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="scikit-learn digits")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    x_train, name = load_images(None if a.quick else a.data_dir, "train")
    sizes, batch_size = (AUTOENCODER_SIZES, 1000) if name == "mnist" else (DIGITS_SIZES, 100)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads; {name}, batch "
          f"{batch_size}; medians of {a.steps} interleaved steps after {a.warmup}", flush=True)
    print("| recipe | step off (s) | step on (s) | on/off | inner off (s) | inner on (s) | on/off | compile (s) | "
          "loss rel. diff |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    out = []
    for _ in range(a.repeats):
        for recipe in a.recipes.split(","):
            r = measure(recipe, x_train, sizes, batch_size, a.steps, a.warmup)
            out.append(r)
            print(f"| {recipe} | {r['step_off']:.3f} | {r['step_on']:.3f} | {r['step_ratio']:.2f} | "
                  f"{r['inner_off']:.3f} | {r['inner_on']:.3f} | {r['inner_ratio']:.2f} | {r['compile_s']:.0f} | "
                  f"{r['loss_rel_diff']:.1e} |", flush=True)
    return out


if __name__ == "__main__":
    main()
