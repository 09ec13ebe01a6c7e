"""Train a small CNN on scikit-learn's 8×8 digits with lwcompile (no download needed).

    python examples/cnn_digits.py --epochs 5

Prints the compiled block table, then a progress bar with the loss, then train/test accuracy per epoch.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from tqdm import tqdm

import lwcompile
from lwcompile.experiments.data import load_digits_images, load_digits_labels
from lwcompile.experiments.models import small_cnn


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--target", default="md_post")
    ap.add_argument("--loss", default="matching")
    ap.add_argument("--steps", type=int, default=10, help="inner iterations T")
    ap.add_argument("--inner-lr", type=float, default=1e-4)
    ap.add_argument("--gamma", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    xtr, ytr = load_digits_images("train"), load_digits_labels("train")
    xte, yte = load_digits_images("test"), load_digits_labels("test")
    model = small_cnn(num_classes=10, seed=args.seed)
    config = lwcompile.Config(target=args.target, local_loss=args.loss, gamma=args.gamma, steps=args.steps,
                              inner_optimizer="rmsprop_tf1", inner_lr=args.inner_lr, inner_lr_decay=True)
    prog = lwcompile.transform(model, F.cross_entropy, xtr[: args.batch_size], config)
    print(prog)
    history = {"loss": [], "train_acc": [], "test_acc": []}
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        perm = torch.randperm(len(xtr), generator=g)
        n = len(xtr) // args.batch_size
        bar = tqdm(range(n), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        losses = []
        for i in bar:
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            losses.append(prog.step(xtr[idx], ytr[idx]))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        history["loss"].append(sum(losses) / len(losses))
        history["train_acc"].append(accuracy(model, xtr, ytr))
        history["test_acc"].append(accuracy(model, xte, yte))
        print(f"epoch {epoch + 1:3d}  loss {history['loss'][-1]:.4f}  train acc {history['train_acc'][-1]:.3f}  "
              f"test acc {history['test_acc'][-1]:.3f}")
    return history


if __name__ == "__main__":
    main()
