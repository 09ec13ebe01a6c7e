"""``benchmarks/time_to_target.py --quick`` (scikit-learn digits): the table's structure and numbers checked
against independent oracles: the step-0 loss of every method is a float64 evaluation of the shared init on the
same images; the lwcompile "best" row's GFLOP/s is the closed-form solve's FLOP count (written out here) over the
measured inner time; every "to target" entry is the first evaluation at or below the target; the goal ratios
are the quotients of those seconds."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from lwcompile.experiments.data import load_images
from lwcompile.experiments.models import deep_autoencoder, sigmoid_xent_sum

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("bench_time_to_target", ROOT / "benchmarks" / "time_to_target.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    bench = _load()
    out = tmp_path_factory.mktemp("ttt")
    res = bench.main(["--quick", "--threads", "1", "--budget-s", "1.0", "--grid-s", "0.3", "--out", str(out)])
    return bench, res, out


def test_table_has_every_method_and_column(quick):
    bench, res, out = quick
    md = (out / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols == (["method", "setting"] + [f"{k} to {t:g}" for t in res["targets"] for k in ("steps", "s")]
                    + ["median step (s)", "GFLOP/s", "% of matmul", "final loss"])
    names = [r["name"] for r in res["runs"]]
    try:
        import locoprop  # noqa: F401
        assert "peer" in names
    except ImportError:
        assert "peer" not in names and any("locoprop" in n for n in res["notes"]) and "peer skipped" in md
    assert [n for n in names if n != "peer"] == ["best", "adam", "defaults", "paper-M", "rmsprop"]
    for r in res["runs"]:
        assert md.count(f"| {r['name']} | ") >= 1
    assert res["cpu"] in md and "CPU:" in md
    assert (out / "loss_vs_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text())["targets"] == res["targets"]


def test_every_method_starts_from_the_same_init_loss_computed_in_float64(quick):
    _, res, _ = quick
    x, _ = load_images(None, "train")
    x_eval = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:10_000]].double()
    model = deep_autoencoder((64, 32, 16, 8, 16, 32, 64), seed=0).double()
    with torch.no_grad():
        oracle = float(sigmoid_xent_sum(model(x_eval), x_eval))
    for r in res["runs"]:
        steps, clock, loss = r["evals"][0]
        assert steps == 0 and clock == 0.0
        assert loss == pytest.approx(oracle, rel=1e-5), r["name"]


def test_best_recipe_gflops_is_the_closed_form_flop_count_over_the_inner_time(quick):
    _, res, _ = quick
    best = next(r for r in res["runs"] if r["name"] == "best")
    sizes, B = (64, 32, 16, 8, 16, 32, 64), 100
    flops = 0
    for d_in, out in zip(sizes[:-1], sizes[1:]):
        D = d_in + 1  # weights and bias, one Gram matrix per layer
        # Gram XᵀX, right-hand side XᵀR, Cholesky, two triangular solves; Z = XWᵀ + b is the forward pass's â
        flops += 2 * B * D * D + 2 * B * D * out + D ** 3 // 3 + 2 * D * D * out
    assert best["gflops"] * best["median_inner_s"] * 1e9 == pytest.approx(flops, rel=1e-9)
    assert best["pct_of_matmul"] == pytest.approx(100 * best["gflops"] / max(res["matmul_gflops"]), rel=1e-9)


def test_time_to_target_is_the_first_evaluation_at_or_below_it_and_goals_are_their_ratios(quick):
    _, res, _ = quick
    for r in res["runs"]:
        for t in res["targets"]:
            hit = next(((s, c) for s, c, loss in r["evals"] if loss <= t), None)
            got = r[f"to_{t:g}"]
            assert (got is None) == (hit is None)
            if hit:
                assert (got["steps"], got["s"]) == hit
    by = {r["name"]: r for r in res["runs"]}
    hi = f"to_{max(res['targets']):g}"
    key = next(k for k in res["goals"] if k.startswith("best / adam") and f"{max(res['targets']):g} (" in k)
    if by["best"][hi] and by["adam"][hi]:
        assert res["goals"][key] == {"value": pytest.approx(by["best"][hi]["s"] / by["adam"][hi]["s"]), "bound": "="}
    elif by["best"][hi]:  # adam never got there: the ratio is an upper bound, against adam's whole clock
        assert res["goals"][key] == {"value": pytest.approx(by["best"][hi]["s"] / by["adam"]["clock_s"]), "bound": "<"}
    assert all(v is None or (math.isfinite(v["value"]) and v["value"] > 0) for v in res["goals"].values())


def test_each_lever_is_measured_on_and_off_without_changing_the_weights(quick):
    """The levers' on/off rows: every recipe × lever, times positive, and the weights after the interleaved steps
    equal (bitwise for the iterative recipes, whose reused â is the same op on the same values; to rounding for the
    exact solve, which forms Z = XWᵀ + b itself)."""
    bench, res, out = quick
    rows = res["levers"]
    recipes = {r["recipe"] for r in rows}
    assert recipes == set(bench.RECIPES) and {r["lever"] for r in rows} == set(bench.LEVERS)
    for r in rows:
        assert r["on_step_s"] > 0 and r["off_step_s"] > 0 and r["on_inner_s"] > 0
        assert math.isclose(r["step_ratio"], r["on_step_s"] / r["off_step_s"])
        if r["lever"] == "reuse_preactivation":
            assert r["max_rel_diff"] <= (1e-4 if bench.RECIPES[r["recipe"]].inner_optimizer == "exact" else 0.0)
    assert "## Levers on and off" in (out / "results.md").read_text()
