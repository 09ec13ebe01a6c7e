"""Plot the per-epoch train loss of several `examples/autoencoder.py` runs (their losses.csv) on one figure.

    python benchmarks/compare_runs.py docs/results/*.csv --out docs/results/mnist_5ep.png
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_curve(path: Path) -> tuple[list[int], list[float]]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return [int(r["epoch"]) for r in rows], [float(r["train_loss"]) for r in rows]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    print(f"{'run':40s} " + " ".join(f"ep{e:<6d}" for e in range(6)))
    for path in args.csv:
        epochs, loss = read_curve(path)
        ax.plot(epochs, loss, marker="o", label=path.stem)
        print(f"{path.stem:40s} " + " ".join(f"{v:<8.1f}" for v in loss))
    ax.set_yscale("log")
    ax.set_xlabel("epoch (60 steps of batch 1000)")
    ax.set_ylabel("train loss, whole set (sigmoid xent summed over pixels)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
