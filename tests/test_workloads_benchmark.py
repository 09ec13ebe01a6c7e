"""benchmarks/workloads.py --quick: every workload and method row runs, and the table's numbers are consistent."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import workloads as bench  # noqa: E402


def test_quick_run_writes_a_consistent_table(tmp_path):
    res = bench.main(["--quick", "--methods", "adam,defaults,exact", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert set(on_disk["workloads"]) == {"autoencoder", "cnn", "mlp", "lm"}
    assert (tmp_path / "results.md").read_text().count("| adam |") >= 4
    for name, w in res["workloads"].items():
        assert (tmp_path / f"loss_vs_seconds_{name}.png").stat().st_size > 0
        assert {"adam", "lwcompile"} <= {r["family"] for r in w["runs"]}
        for r in w["runs"]:
            assert r["steps"] >= 1 and r["median_step_s"] > 0 and r["peak_bytes"] > 0
            assert math.isfinite(r["init_loss"])
            # the split adds up to the step it splits (medians of parts need not sum exactly: allow slack)
            assert sum(r["split_s"].values()) <= 3 * r["median_step_s"] + 1e-3
            reached = [r[f"to_{t:g}"] for t in w["targets"]]
            times = [x["s"] for x in reached if x is not None]
            # a tighter target is never reached before a looser one
            assert times == sorted(times)
            # the evaluations are the loss the targets are read from: reached means an eval at or below it
            for t, x in zip(w["targets"], reached):
                if x is not None:
                    assert min(e[2] for e in r["evals"]) <= t
    assert "goals" in res and res["cpu"]


def test_budget_per_workload_parses_and_refuses_bad_values():
    import pytest
    assert bench.parse_budgets("12,autoencoder=30", ["autoencoder", "mlp"], 20.0) == {"autoencoder": 30.0, "mlp": 12.0}
    assert bench.parse_budgets(None, ["mlp"], 20.0) == {"mlp": 20.0}
    for bad in ("x", "mlp=0", "lm=5"):
        with pytest.raises(ValueError, match="--budget"):
            bench.parse_budgets(bad, ["mlp"], 20.0)
