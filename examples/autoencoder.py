"""Train the paper's deep autoencoder with lwcompile (LocoProp) or plain backprop; write a CSV and a plot.

The paper's recipe (LocoProp-M on MNIST): batch 1000, γ = 10, T = 10 inner iterations of TF1-style RMSProp
(momentum 0.999, decay 0.9, ε = 1e-5) with inner step lr·max(1 − k/T, 0.25), base inner lr 1e-5 with the
official code's per-epoch schedule (linear warm-up e/5 over 5 epochs, so epoch 0 runs at lr 0, then linear
decay 1 − (e + 1 − 5)/95; Config's inner-lr schedule fields from ``reference_schedule``), no proximal term. The train loss logged per epoch is the official code's: the task
loss over the whole training set at the end of the epoch (the mean of the epoch's batch losses is logged too).

    python examples/autoencoder.py                          # MNIST at ../shared/data/mnist if present, 5 epochs
    python examples/autoencoder.py --method locoprop-s --epochs 10
    python examples/autoencoder.py --method backprop-adam --lr 1e-3
    python examples/autoencoder.py --data-dir digits --epochs 20   # scikit-learn's 8x8 digits, 64-32-16-8-16-32-64

Methods: locoprop-m (md_post + matching), locoprop-s (gd_pre + squared_pre), locoprop-gdpost (gd_post +
squared_post), locoprop-dual (dual_md_pre + dual_bregman), backprop-adam, backprop-sgd (momentum 0.9),
backprop-rmsprop.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

import lwcompile
from lwcompile.experiments.data import batches, load_images
from lwcompile.experiments.models import (backprop_optimizer, AUTOENCODER_SIZES, bce_sum, deep_autoencoder,
                                          full_loss, outputs_to_logits, reference_schedule, sigmoid_xent_sum)
from lwcompile.schedule import schedule_factor

DIGITS_SIZES = (64, 32, 16, 8, 16, 32, 64)  # the same shape of net, scaled to 8x8 inputs

# method -> (target, local loss)
LOCOPROP = {
    "locoprop-m": ("md_post", "matching"),
    "locoprop-s": ("gd_pre", "squared_pre"),
    "locoprop-gdpost": ("gd_post", "squared_post"),
    "locoprop-dual": ("dual_md_pre", "dual_bregman"),
}
BACKPROP = {"backprop-adam": "adam", "backprop-sgd": "sgd", "backprop-rmsprop": "rmsprop"}
METHODS = tuple(LOCOPROP) + tuple(BACKPROP)
BACKPROP_DEFAULT_LR = {"adam": 1e-3, "sgd": 1e-4, "rmsprop": 1e-4}


class Trainer:
    """One method on one model: ``step(x) -> loss``, ``lr`` (the next step's) and ``logits_model`` for evaluation.

    ``schedule`` holds Config's inner-lr schedule fields (e.g. :func:`reference_schedule`): the program follows them
    itself; the backprop baselines' optimizer lr follows the same factors (:func:`schedule_factor`).
    """

    def __init__(self, method: str, sizes: Sequence[int], example: torch.Tensor, seed: int = 0, lr: float | None = None,
                 gamma: float = 10.0, steps: int = 10, inner_lr: float = 1e-5, momentum: float = 0.999,
                 decay: float = 0.9, eps: float = 1e-5, inner_lr_decay: bool = True, prox: float = 0.0,
                 output_sigmoid: bool = True, schedule: Mapping[str, Any] | None = None) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        self.method = method
        self.schedule = lwcompile.Config(**dict(schedule or {}))  # only its schedule fields are read
        self.steps_done = 0
        self.program: lwcompile.Program | None = None
        if method in LOCOPROP:
            target, local = LOCOPROP[method]
            self.model = deep_autoencoder(sizes, seed=seed, output_sigmoid=output_sigmoid)
            cfg = lwcompile.Config(target=target, local_loss=local, gamma=gamma, steps=steps,
                                   inner_optimizer="rmsprop_tf1", inner_lr=inner_lr, momentum=momentum, decay=decay,
                                   eps=eps, inner_lr_decay=inner_lr_decay, prox=prox, **dict(schedule or {}))
            self.program = lwcompile.transform(self.model, bce_sum if output_sigmoid else sigmoid_xent_sum,
                                               (example,), cfg)
            self.base_lr = inner_lr
        else:
            self.model = deep_autoencoder(sizes, seed=seed)
            self.base_lr = BACKPROP_DEFAULT_LR[BACKPROP[method]] if lr is None else lr
            self.opt = backprop_optimizer(BACKPROP[method], self.model.parameters(), self.base_lr)
        self.logits_model = outputs_to_logits(self.model)

    @property
    def lr(self) -> float:
        """The next step's learning rate (the paper's schedule runs epoch 0 at 0: the weights stay put while the
        RMSProp mean-square slots warm up, as in the official code)."""
        if self.program is not None:
            return self.program.effective_inner_lr
        return self.base_lr * schedule_factor(self.schedule, self.steps_done)

    def step(self, xb: torch.Tensor) -> float:
        if self.program is not None:
            return self.program.step(xb, xb)
        for g in self.opt.param_groups:
            g["lr"] = self.lr
        self.steps_done += 1
        self.opt.zero_grad(set_to_none=True)
        loss = sigmoid_xent_sum(self.model(xb), xb)
        loss.backward()
        self.opt.step()
        return float(loss.detach())


def resolve_data(data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """"auto" -> the shared MNIST if present, else digits; "digits" -> digits; anything else -> MNIST from it."""
    arg = None if data_dir in ("digits", "none", "") else data_dir
    x_train, name = load_images(arg, "train")
    x_test, _ = load_images(arg, "test")
    return x_train, x_test, name


def train(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    x_train, x_test, name = resolve_data(args.data_dir)
    if args.train_subset:
        x_train = x_train[:args.train_subset]
    sizes = AUTOENCODER_SIZES if name == "mnist" else DIGITS_SIZES
    batch_size = args.batch_size or (1000 if name == "mnist" else 100)
    steps_per_epoch = x_train.shape[0] // batch_size
    if args.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    schedule = reference_schedule(steps_per_epoch, args.warmup_epochs, args.schedule_epochs) if args.schedule else {}
    trainer = Trainer(args.method, sizes, x_train[:batch_size], seed=args.seed, lr=args.lr, gamma=args.gamma,
                      steps=args.steps, inner_lr=args.inner_lr, momentum=args.momentum, decay=args.decay,
                      eps=args.eps, inner_lr_decay=not args.no_inner_lr_decay, prox=args.prox,
                      output_sigmoid=args.output_layer == "sigmoid", schedule=schedule)
    print(f"data={name} train={tuple(x_train.shape)} test={tuple(x_test.shape)} sizes={sizes} batch={batch_size} "
          f"method={args.method} epochs={args.epochs} steps/epoch={steps_per_epoch} threads={torch.get_num_threads()}",
          flush=True)
    if trainer.program is not None:
        print(trainer.program, flush=True)
    rows = [{"epoch": 0, "step": 0, "lr": 0.0, "train_loss": full_loss(trainer.logits_model, x_train),
             "test_loss": full_loss(trainer.logits_model, x_test), "epoch_mean_batch_loss": float("nan"),
             "median_step_s": float("nan"), "wall_s": 0.0}]
    print(f"init: train {rows[0]['train_loss']:.3f} test {rows[0]['test_loss']:.3f}", flush=True)
    from tqdm import tqdm

    wall, step = 0.0, 0
    bar = tqdm(total=args.epochs * steps_per_epoch, desc=args.method, unit="step", dynamic_ncols=True,
               disable=args.no_progress)
    for epoch in range(args.epochs):
        lr = trainer.lr  # constant within an epoch (the schedule's interval is the epoch)
        losses, times = [], []
        for i, xb in enumerate(batches(x_train, batch_size, epoch=epoch, seed=args.seed)):
            if i >= steps_per_epoch:
                break
            t0 = time.perf_counter()
            loss = trainer.step(xb)
            times.append(time.perf_counter() - t0)
            losses.append(loss)
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.2f}", lr=f"{lr:.2g}")
            if not math.isfinite(loss):
                break
        wall += sum(times)
        times.sort()
        row = {"epoch": epoch + 1, "step": step, "lr": lr, "train_loss": full_loss(trainer.logits_model, x_train),
               "test_loss": full_loss(trainer.logits_model, x_test),
               "epoch_mean_batch_loss": sum(losses) / max(len(losses), 1),
               "median_step_s": times[len(times) // 2] if times else float("nan"), "wall_s": wall}
        rows.append(row)
        bar.write(f"epoch {epoch + 1}: train {row['train_loss']:.3f} test {row['test_loss']:.3f} "
                  f"(epoch mean of batch losses {row['epoch_mean_batch_loss']:.3f}) lr {lr:.3g} "
                  f"median step {row['median_step_s']:.3f}s")
        if not all(math.isfinite(row[k]) for k in ("train_loss", "test_loss")):
            bar.write("non-finite loss: stopping")
            break
    bar.close()
    return rows, name


def write_outputs(rows: list[dict[str, Any]], out: Path, title: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "losses.csv", out / "losses.png"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ep = [r["epoch"] for r in rows]
    ax.plot(ep, [r["train_loss"] for r in rows], "o-", label="train (whole set, end of epoch)")
    ax.plot(ep, [r["test_loss"] for r in rows], "s--", label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("sigmoid cross-entropy (sum over pixels)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return csv_path, png_path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default="auto",
                   help="MNIST idx directory; 'auto' = ../shared/data/mnist if present else sklearn digits; 'digits'")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--method", choices=METHODS, default="locoprop-m")
    p.add_argument("--batch-size", type=int, default=None, help="default 1000 (MNIST) / 100 (digits)")
    p.add_argument("--seed", type=int, default=0, help="init and data order")
    p.add_argument("--out", type=Path, default=None, help="output directory (default runs/autoencoder-<method>)")
    p.add_argument("--lr", type=float, default=None, help="backprop learning rate (default per optimizer)")
    p.add_argument("--gamma", type=float, default=10.0, help="activation learning rate γ")
    p.add_argument("--steps", type=int, default=10, help="inner iterations T")
    p.add_argument("--inner-lr", type=float, default=1e-5)
    p.add_argument("--momentum", type=float, default=0.999)
    p.add_argument("--decay", type=float, default=0.9)
    p.add_argument("--eps", type=float, default=1e-5)
    p.add_argument("--prox", type=float, default=0.0)
    p.add_argument("--no-inner-lr-decay", action="store_true", help="turn off lr·max(1 − k/T, 0.25)")
    p.add_argument("--no-schedule", dest="schedule", action="store_false",
                   help="constant lr instead of the official warm-up/decay schedule (applies to backprop too)")
    p.add_argument("--warmup-epochs", type=int, default=5)
    p.add_argument("--schedule-epochs", type=int, default=100, help="N of the decay 1 − (e + 1 − W)/(N − W)")
    p.add_argument("--output-layer", choices=("sigmoid", "identity"), default="sigmoid",
                   help="LocoProp's last block: 'sigmoid' (model ends in nn.Sigmoid, as the official code's matching "
                        "loss) or 'identity' (logits model, sigmoid folded into the task loss)")
    p.add_argument("--train-subset", type=int, default=0, help="use only the first N training images")
    p.add_argument("--max-steps-per-epoch", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    rows, data_name = train(args)
    out = args.out or Path("runs") / f"autoencoder-{args.method}"
    csv_path, png_path = write_outputs(rows, out, f"{args.method} on {data_name}")
    print(f"wrote {csv_path} and {png_path}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
