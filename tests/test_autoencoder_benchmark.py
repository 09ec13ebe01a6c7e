"""Smoke test of ``benchmarks/autoencoder.py --quick`` and ``examples/autoencoder.py`` on the bundled digits.

Checks numbers that can be checked independently: the loss every method reports at step 0 equals a float64
evaluation of the task loss of the initial model on the first batch; the reported ratios and GFLOP/s are what
the recorded times and FLOP counts give; LocoProp-M's losses are finite and go down; the files are written.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from lwcompile.experiments.data import batches, load_images
from lwcompile.experiments.models import deep_autoencoder, sigmoid_xent_sum

ROOT = Path(__file__).resolve().parent.parent


def _load(rel: str, name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    bench = _load("benchmarks/autoencoder.py", "bench_autoencoder")
    out = tmp_path_factory.mktemp("bench")
    res = bench.main(["--quick", "--out", str(out), "--no-progress", "--threads", "1"])
    return res, out


def test_files_written(quick):
    res, out = quick
    for f in ("results.md", "results.json", "curves.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["steps"] == res["steps"]
    md = (out / "results.md").read_text()
    for name in ("locoprop-m", "locoprop-s", "gdpost-squared", "dualmd-bregman", "adam", "sgd", "rmsprop"):
        assert name in md
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_step0_loss_is_the_float64_init_loss(quick):
    res, _ = quick
    x, _ = load_images(None, "train")
    first = next(batches(x, res["batch_size"], epoch=0, seed=res["seed"])).double()
    model = deep_autoencoder(res["sizes"], seed=res["seed"]).double()
    with torch.no_grad():
        direct = float(sigmoid_xent_sum(model(first), first))
    assert res["init_loss_first_batch_float64"] == pytest.approx(direct, rel=1e-12)
    for rec in res["locoprop"] + res["backprop"]:  # same init, same first batch, loss before the update
        assert rec["batch_losses"][0] == pytest.approx(direct, rel=1e-5), rec["name"]


def test_locoprop_m_finite_and_decreasing(quick):
    res, _ = quick
    m = next(r for r in res["locoprop"] if r["name"] == "locoprop-m")
    losses = m["batch_losses"]
    assert not m["diverged"] and all(math.isfinite(v) for v in losses)
    assert len(losses) >= res["steps"]
    k = 5
    assert sum(losses[-k:]) / k < 0.8 * sum(losses[:k]) / k
    assert m["at_steps"]["train"] < 0.8 * res["init_train_loss"]
    assert m["at_steps"]["test"] < 0.8 * res["init_test_loss"]


def test_reported_ratios_and_rates(quick):
    res, _ = quick
    adam = next(r for r in res["backprop"] if r["name"] == res["best_backprop"]["adam"])
    assert res["adam_median_step_s"] == adam["median_step_s"] > 0
    for rec in res["locoprop"]:
        assert rec["median_step_s"] > 0 and rec["median_inner_s"] > 0
        assert rec["median_inner_s"] <= rec["median_total_s"] * (1 + 1e-9) + 1e-3
        # FLOPs: 2 matmuls (forward z = Wx and the weight gradient) per inner iteration, T = 10.
        flops = sum(2 * 10 * 2 * a * b * res["batch_size"] for a, b in zip(res["sizes"][:-1], res["sizes"][1:]))
        assert rec["inner_flops_per_step"] == flops
        assert rec["median_inner_gflops"] > 0
    assert all(g > 0 for g in res["matmul_gflops"])
    # Equal wall-clock: LocoProp-M defines the budget; the continued backprop runs reached it.
    m = next(r for r in res["locoprop"] if r["name"] == "locoprop-m")
    assert res["equal_time_s"] == pytest.approx(res["steps"] * m["median_step_s"])
    assert m["at_equal_time"] == m["at_steps"]
    for name in res["best_backprop"].values():
        rec = next(r for r in res["backprop"] if r["name"] == name)
        n_eq = min(math.ceil(res["equal_time_s"] / rec["median_step_s"]), 50 * res["steps"])
        assert rec["at_equal_time"]["steps"] == max(n_eq, res["steps"]) == rec["steps"]
        assert len(rec["batch_losses"]) == rec["steps"]


def test_example_writes_csv_and_plot(tmp_path):
    ex = _load("examples/autoencoder.py", "example_autoencoder")
    rows = ex.main(["--data-dir", "digits", "--epochs", "2", "--max-steps-per-epoch", "4", "--warmup-epochs", "0",
                    "--out", str(tmp_path), "--no-progress", "--threads", "1"])
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    with open(tmp_path / "losses.csv") as f:
        got = list(csv.DictReader(f))
    assert [int(r["step"]) for r in got] == [0, 4, 8]
    assert all(math.isfinite(float(r["train_loss"])) and math.isfinite(float(r["test_loss"])) for r in got)
    assert float(got[-1]["train_loss"]) < float(got[0]["train_loss"])
    assert (tmp_path / "losses.png").read_bytes()[:4] == b"\x89PNG"
