"""Study (issue 17): why LocoProp-S loses to Adam on the char-level Transformer LM, and Config()'s momentum.

Load-independent by design: every number is a count of steps or a loss after a fixed number of steps (each method
starts from the same init and sees batch k at step k), and the step's split comes from ``prog.last_timings`` as
fractions of one run's own step time. Single torch thread.

Sections (``--section``):

- ``lm``: LocoProp recipes on the LM (skip, gamma, prox, outer lr, inner optimizer), against Adam.
- ``norm``: a prototype of a per-output normalization of the exact solve's target residual (monkeypatched into
  ``passes/exact_solver._solve`` for this process only; not a library feature).
- ``diag``: per-block diagnostics: relative update size per block (and per q/k/v slice of the attention input
  projection) for Adam and the exact recipe, and the q/k/v gradient norms at init.
- ``momentum``: ``Config()`` (rmsprop_tf1) with momentum 0.999 / 0.995 / 0.99 on all four workloads.

    python benchmarks/lm_study.py --section lm --steps 200
    python benchmarks/lm_study.py --section momentum
    python benchmarks/lm_study.py --report   # merge the saved sections into docs/results/lm_study/results.md

Each section writes ``docs/results/lm_study/SECTION.json``; ``--report`` writes ``results.md`` from them.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

import lwcompile
from lwcompile import Config
from lwcompile.experiments.workloads import WORKLOADS, LoadedWorkload

OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "lm_study"
S = dict(target="gd_pre", local_loss="squared_pre", inner_optimizer="exact")
REL = dict(S, prox=1.0, prox_relative=True)
ATTN = r"self_attn\.in_proj"
FFN_ONLY = ("^head$", ATTN, "out_proj")  # skip= that leaves only linear1/linear2 as blocks

LM_RECIPES: dict[str, Config] = {
    "exact g4000": Config(**REL, gamma=4000.0),
    "exact g4000 o3e-3": Config(**REL, gamma=4000.0, outer_lr=3e-3),
    "exact g4000 o3e-3 skip head": Config(**REL, gamma=4000.0, outer_lr=3e-3, skip=("^head$",)),
    "exact g4000 o3e-3 skip in_proj": Config(**REL, gamma=4000.0, outer_lr=3e-3, skip=(ATTN,)),
    "exact g4000 o3e-3 skip head+in_proj": Config(**REL, gamma=4000.0, outer_lr=3e-3, skip=("^head$", ATTN)),
    "exact g4000 o3e-3 skip out_proj": Config(**REL, gamma=4000.0, outer_lr=3e-3, skip=(r"out_proj",)),
    "exact g4000 o3e-3 skip linear1": Config(**REL, gamma=4000.0, outer_lr=3e-3, skip=(r"linear1",)),
    "exact g4000 o3e-3 skip linear2": Config(**REL, gamma=4000.0, outer_lr=3e-3, skip=(r"linear2",)),
    "exact g4000 o3e-3 only linear1+2": Config(**REL, gamma=4000.0, outer_lr=3e-3, skip=FFN_ONLY),
    "exact g2000 o3e-3 skip head+in_proj": Config(**REL, gamma=2000.0, outer_lr=3e-3, skip=("^head$", ATTN)),
    "exact g8000 o3e-3 skip head+in_proj": Config(**REL, gamma=8000.0, outer_lr=3e-3, skip=("^head$", ATTN)),
    "exact g16000 o3e-3 skip head+in_proj": Config(**REL, gamma=16000.0, outer_lr=3e-3, skip=("^head$", ATTN)),
    "exact g8000 p0.3 o3e-3 skip head+in_proj": Config(**dict(REL, prox=0.3), gamma=8000.0, outer_lr=3e-3,
                                                      skip=("^head$", ATTN)),
    "exact g16000 p3 o3e-3 skip head+in_proj": Config(**dict(REL, prox=3.0), gamma=16000.0, outer_lr=3e-3,
                                                     skip=("^head$", ATTN)),
    "exact g16000": Config(**REL, gamma=16000.0, outer_lr=3e-3),
    "S-adam T3 g10 lr1e-3 o3e-3": Config(target="gd_pre", local_loss="squared_pre", inner_optimizer="adam", steps=3,
                                         gamma=10.0, inner_lr=1e-3, outer_lr=3e-3),
    "S-adam T3 g100 lr1e-3 o3e-3": Config(target="gd_pre", local_loss="squared_pre", inner_optimizer="adam",
                                          steps=3, gamma=100.0, inner_lr=1e-3, outer_lr=3e-3),
    # the exact solve on the feed-forward blocks only; attention projections and the tied head go to Adam
    "ffn g2000 o3e-3": Config(**REL, gamma=2000.0, outer_lr=3e-3, skip=FFN_ONLY),
    "ffn g8000 o3e-3": Config(**REL, gamma=8000.0, outer_lr=3e-3, skip=FFN_ONLY),
    "ffn g16000 o3e-3": Config(**REL, gamma=16000.0, outer_lr=3e-3, skip=FFN_ONLY),
    "ffn g4000 p0.3 o3e-3": Config(**dict(REL, prox=0.3), gamma=4000.0, outer_lr=3e-3, skip=FFN_ONLY),
    "ffn g8000 p3 o3e-3": Config(**dict(REL, prox=3.0), gamma=8000.0, outer_lr=3e-3, skip=FFN_ONLY),
    "ffn g4000 o2e-3": Config(**REL, gamma=4000.0, outer_lr=2e-3, skip=FFN_ONLY),
    "ffn g4000 o5e-3": Config(**REL, gamma=4000.0, outer_lr=5e-3, skip=FFN_ONLY),
    "Config() o3e-3": Config(outer_lr=3e-3),
    "Config() m0.99 o3e-3": Config(momentum=0.99, outer_lr=3e-3),
    "Config() m0.99 lr3e-4 o3e-3": Config(momentum=0.99, inner_lr=3e-4, outer_lr=3e-3),
}

# prototype recipes of the `norm` section: (Config, residual normalization); see _normalized_solve
NORM_RECIPES: dict[str, tuple[Config, str]] = {
    "col g4000 o3e-3": (Config(**REL, gamma=4000.0, outer_lr=3e-3), "col"),
    "col g8000 o3e-3": (Config(**REL, gamma=8000.0, outer_lr=3e-3), "col"),
    "col g16000 o3e-3": (Config(**REL, gamma=16000.0, outer_lr=3e-3), "col"),
    "col g8000 o3e-3 skip head": (Config(**REL, gamma=8000.0, outer_lr=3e-3, skip=("^head$",)), "col"),
    "col g4000 o3e-3 skip head": (Config(**REL, gamma=4000.0, outer_lr=3e-3, skip=("^head$",)), "col"),
    "col g4000 o3e-3 ffn only": (Config(**REL, gamma=4000.0, outer_lr=3e-3, skip=FFN_ONLY), "col"),
    "col g8000 o3e-3 ffn only": (Config(**REL, gamma=8000.0, outer_lr=3e-3, skip=FFN_ONLY), "col"),
    "col g16000 o3e-3 skip head+in_proj": (Config(**REL, gamma=16000.0, outer_lr=3e-3, skip=("^head$", ATTN)), "col"),
    "col g32000 o3e-3": (Config(**REL, gamma=32000.0, outer_lr=3e-3), "col"),
}
LM_RECIPES["ffn g2000 o3e-3 col"] = Config(**REL, gamma=2000.0, outer_lr=3e-3, skip=FFN_ONLY, residual_norm="output")
LM_RECIPES["col g16000 o3e-3 (library)"] = Config(**REL, gamma=16000.0, outer_lr=3e-3, residual_norm="output")
_NORM = {"mode": "none"}

MOMENTA = (0.999, 0.995, 0.99)
MOMENTUM_STEPS = {"autoencoder": 150, "cnn": 150, "mlp": 300, "lm": 200}


# ---------------------------------------------------------------- the residual-normalization prototype
def _install_norm_prototype() -> None:
    """Wrap ``exact_solver._solve`` so that, when ``_NORM['mode'] == 'col'``, each output column of the residual
    R (rows × O) is rescaled to the block's mean column norm: ‖R_j‖ → ‖R‖_F/√O. The block's total move is kept;
    outputs whose loss gradient is tiny (q/k at init) move as much as the others, as with Adam's per-entry
    normalization. Traced into the inner graph at the first step, so set the mode before ``transform``'s first
    ``step``."""
    import lwcompile.passes.exact_solver as es
    if getattr(es, "_lm_study_wrapped", False):
        return
    orig = es._solve

    def solve(X, R, *args, **kw):
        if _NORM["mode"] == "col":
            col = R.pow(2).sum(1, keepdim=True).sqrt()  # (G, 1, O)
            mean = R.pow(2).sum((1, 2), keepdim=True).div(R.shape[2]).sqrt()
            R = R * (mean / col.clamp_min(1e-30 * mean.clamp_min(1e-30)))
        return orig(X, R, *args, **kw)
    es._solve = solve
    es._lm_study_wrapped = True


# ---------------------------------------------------------------- one run
def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _rel_updates(before: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, float]:
    """‖ΔW‖/‖W‖ per parameter, and per q/k/v slice of each attention in_proj weight."""
    out = {}
    for n, p in model.named_parameters():
        d, w = p.detach() - before[n], before[n]
        out[n] = float(d.norm() / w.norm().clamp_min(1e-12))
        if n.endswith("in_proj_weight"):
            e = w.shape[0] // 3
            for i, part in enumerate("qkv"):
                out[f"{n}[{part}]"] = float(d[i * e:(i + 1) * e].norm() / w[i * e:(i + 1) * e].norm())
    return out


def run(w: LoadedWorkload, spec: str | Config, steps: int, eval_every: int, diag: bool = False,
        norm: str = "none", seed: int = 0) -> dict[str, Any]:
    """Train ``steps`` steps from the workload's init (batch k at step k); the eval loss every ``eval_every`` steps.
    Returns the evaluations, steps to each target, the step's split (fractions) and, with ``diag``, the mean
    relative update per parameter over the run."""
    torch.manual_seed(seed)
    model = w.build(seed=seed)
    prog = None
    if isinstance(spec, str) and spec.startswith("adam@"):
        opt = torch.optim.Adam(model.parameters(), lr=float(spec[5:]))

        def step(xb, yb) -> None:
            opt.zero_grad(set_to_none=True)
            w.loss_fn(model(xb), yb).backward()
            opt.step()
    else:
        _NORM["mode"] = norm
        xb, yb = w.batch(0)
        prog = lwcompile.transform(model, w.loss_fn, (xb,), spec, example_labels=(yb,))

        def step(xb, yb) -> None:
            prog.step(xb, yb)
    evals = [(0, w.eval_loss(model))]
    splits: list[tuple[float, float, float]] = []
    upd: dict[str, list[float]] = {}
    diverged = False
    for k in range(steps):
        before = _snapshot(model) if diag else None
        try:
            step(*w.batch(k))
        except lwcompile.NonFiniteError:
            diverged = True
            break
        if prog is not None and k > 0:
            t = prog.last_timings
            splits.append((t["target"] / t["total"], t["inner"] / t["total"], t["update"] / t["total"]))
        if diag:
            for n, v in _rel_updates(before, model).items():
                upd.setdefault(n, []).append(v)
        if (k + 1) % eval_every == 0 or k + 1 == steps:
            loss = w.eval_loss(model)
            evals.append((k + 1, loss))
            if not math.isfinite(loss) or loss > 10 * evals[0][1]:
                diverged = True
                break
    hit = {str(t): next((s for s, l in evals if l <= t), None) for t in w.targets}
    split = tuple(statistics.median(s[i] for s in splits) for i in range(3)) if splits else None
    res = {"evals": evals, "to_target": hit, "final": evals[-1][1], "best": min(l for _, l in evals),
           "diverged": diverged, "split": split}
    if diag:
        res["rel_update"] = {n: statistics.mean(v) for n, v in upd.items()}
    _NORM["mode"] = "none"
    return res


def grad_norms(w: LoadedWorkload, seed: int = 0, batches: int = 4) -> dict[str, float]:
    """The task loss's gradient norm per q/k/v slice of each attention in_proj weight (and every weight matrix) at
    init, averaged over the first ``batches`` batches, each divided by the slice's weight norm."""
    model = w.build(seed=seed)
    acc: dict[str, float] = {}
    for k in range(batches):
        model.zero_grad(set_to_none=True)
        w.loss_fn(model(w.batch(k)[0]), w.batch(k)[1]).backward()
        for n, p in model.named_parameters():
            if p.dim() != 2 or p.grad is None:
                continue
            if n.endswith("in_proj_weight"):
                e = p.shape[0] // 3
                for i, part in enumerate("qkv"):
                    acc[f"{n}[{part}]"] = acc.get(f"{n}[{part}]", 0.0) + float(p.grad[i * e:(i + 1) * e].norm()) / batches
            else:
                acc[n] = acc.get(n, 0.0) + float(p.grad.norm()) / batches
    return acc


# ---------------------------------------------------------------- sections
def _describe(spec: str | Config) -> str:
    if isinstance(spec, str):
        return spec
    d = Config()
    return "Config(" + ", ".join(f"{f}={getattr(spec, f)!r}" for f in spec.__dataclass_fields__
                                  if getattr(spec, f) != getattr(d, f)) + ")"


def section_lm(steps: int, eval_every: int, names: list[str] | None, seed: int = 0) -> dict[str, Any]:
    w = WORKLOADS["lm"].load()
    rows = []
    specs: list[tuple[str, Any, str]] = [("adam@1e-3", "adam@1e-3", "none"), ("adam@3e-3", "adam@3e-3", "none")]
    specs += [(n, c, "none") for n, c in LM_RECIPES.items()]
    specs = [s for s in specs if names is None or s[0] in names]
    for name, spec, norm in specs:
        t = time.perf_counter()
        r = run(w, spec, steps, eval_every, norm=norm, seed=seed)
        r.update(name=name + (f" (init seed {seed})" if seed else ""), setting=_describe(spec))
        rows.append(r)
        print(f"{name}: final {r['final']:.3f} to {r['to_target']} split {r['split']} ({time.perf_counter() - t:.0f} s)",
              flush=True)
    return {"workload": "lm", "targets": w.targets, "steps": steps, "eval_every": eval_every, "rows": rows}


def section_norm(steps: int, eval_every: int, names: list[str] | None) -> dict[str, Any]:
    _install_norm_prototype()
    w = WORKLOADS["lm"].load()
    rows = []
    for name, (cfg, norm) in NORM_RECIPES.items():
        if names is not None and name not in names:
            continue
        r = run(w, cfg, steps, eval_every, norm=norm)
        r.update(name=name, setting=_describe(cfg) + f" + residual '{norm}'")
        rows.append(r)
        print(f"{name}: final {r['final']:.3f} to {r['to_target']}", flush=True)
    return {"workload": "lm", "targets": w.targets, "steps": steps, "eval_every": eval_every, "rows": rows}


def section_diag(steps: int) -> dict[str, Any]:
    _install_norm_prototype()
    w = WORKLOADS["lm"].load()
    out: dict[str, Any] = {"steps": steps, "grad_at_init": grad_norms(w), "runs": {}}
    for name, spec, norm in (("adam@3e-3", "adam@3e-3", "none"), ("exact g4000 o3e-3", LM_RECIPES["exact g4000 o3e-3"], "none"),
                             ("col g8000 o3e-3", NORM_RECIPES["col g8000 o3e-3"][0], "col")):
        r = run(w, spec, steps, steps, diag=True, norm=norm)
        out["runs"][name] = {"rel_update": r["rel_update"], "final": r["final"]}
        print(name, r["final"], flush=True)
    return out


def section_cost(names: list[str] | None, steps: int = 30) -> dict[str, Any]:
    """ms per step of Adam and each recipe, stepped in turn (round robin) so that load hits all alike."""
    w = WORKLOADS["lm"].load()
    specs = {"adam@3e-3": "adam@3e-3"} | {n: LM_RECIPES[n] for n in (names or ["exact g4000 o3e-3",
                                                                               "exact g4000 o3e-3 only linear1+2"])}
    steppers = {}
    for n, spec in specs.items():
        model = w.build(seed=0)
        if isinstance(spec, str):
            opt = torch.optim.Adam(model.parameters(), lr=3e-3)

            def f(xb, yb, model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                w.loss_fn(model(xb), yb).backward()
                opt.step()
        else:
            prog = lwcompile.transform(model, w.loss_fn, (w.batch(0)[0],), spec, example_labels=(w.batch(0)[1],))
            prog.step(*w.batch(0))  # traces: not timed
            f = prog.step
        steppers[n] = f
    times: dict[str, list[float]] = {n: [] for n in specs}
    for k in range(1, steps + 1):
        for n, f in steppers.items():
            t = time.perf_counter()
            f(*w.batch(k))
            times[n].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in times.items()}
    for n in med:
        print(f"{n}: {1e3 * med[n]:.1f} ms/step ({med[n] / med['adam@3e-3']:.2f}x Adam)", flush=True)
    return {"steps": steps, "median_s": med}


def section_momentum(names: list[str] | None, data: str, steps_override: int = 0) -> dict[str, Any]:
    rows = []
    for wname, steps in MOMENTUM_STEPS.items():
        steps = steps_override or steps
        if names is not None and wname not in names:
            continue
        w = WORKLOADS[wname].load(data)
        if wname != "lm" and w.data != "mnist":
            raise SystemExit(f"{wname}: MNIST not found (got {w.data}); pass --data-dir")
        ev = max(steps // 15, 5)
        for spec in ["adam@3e-3"] + [Config(momentum=m) for m in MOMENTA]:
            t = time.perf_counter()
            r = run(w, spec, steps, ev)
            r.update(workload=wname, name=spec if isinstance(spec, str) else f"Config(momentum={spec.momentum})",
                     targets=w.targets, steps=steps, eval_every=ev)
            rows.append(r)
            print(f"{wname} {r['name']}: final {r['final']:.4g} to {r['to_target']} ({time.perf_counter() - t:.0f} s)",
                  flush=True)
    return {"rows": rows}


# ---------------------------------------------------------------- report
def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _steps(hit: dict, targets) -> list[str]:
    return [str(hit[str(t)]) if hit.get(str(t)) is not None else "—" for t in targets]


def _table(sec: dict[str, Any]) -> list[str]:
    ts = sec["targets"]
    lines = [f"| recipe | " + " | ".join(f"steps to {t}" for t in ts) + f" | loss @100 | loss @{sec['steps']} | "
             "split target/inner/rest | setting |", "|---|" + "---:|" * (len(ts) + 3) + "---|"]
    for r in sorted(sec["rows"], key=lambda r: r["final"]):
        at100 = next((l for s, l in r["evals"] if s == 100), float("nan"))
        sp = "/".join(f"{x:.2f}" for x in r["split"]) if r["split"] else "—"
        lines.append(f"| {r['name']} | " + " | ".join(_steps(r["to_target"], ts)) + f" | {_fmt(at100)} | "
                     f"{_fmt(r['final'])}{' (diverged)' if r['diverged'] else ''} | {sp} | `{r['setting']}` |")
    return lines


def report() -> str:
    lines = ["# LM study (issue 17): LocoProp-S on the char-level Transformer LM, and Config()'s momentum", "",
             f"Machine: {platform.machine()}, torch {torch.__version__}, 1 thread. Everything below is counted in "
             "steps (batch k at step k, the same init for every method), so it does not depend on the machine's "
             "load; the split is the median fraction of one run's own step time (prog.last_timings). Loss = the "
             "workload's fixed evaluation subset. Produced by `python benchmarks/lm_study.py --section S` per "
             "section, then `--report`.", ""]
    for sec, title in (("lm", "LocoProp recipes on the LM"), ("norm", "Per-output residual normalization (Config.residual_norm=\"output\")"),
                       ("lmlong", "The best recipes, 400 steps")):
        p = OUT / f"{sec}.json"
        if p.exists():
            d = json.loads(p.read_text())
            lines += [f"## {title}", "", f"{d['steps']} steps, eval every {d['eval_every']} steps "
                      f"(steps to a target are multiples of it).", ""] + _table(d) + [""]
    p = OUT / "diag.json"
    if p.exists():
        d = json.loads(p.read_text())
        g = d["grad_at_init"]
        lines += ["## Diagnostics", "", "Gradient norm at init (mean of 4 batches), per weight matrix and q/k/v slice:",
                  "", "| parameter | ‖∂L/∂W‖ |", "|---|---:|"] + [f"| {n} | {v:.3g} |" for n, v in g.items()] + [""]
        runs = d["runs"]
        names = list(runs)
        keys = [k for k in runs[names[0]]["rel_update"] if ("weight" in k and "norm" not in k) or "[" in k]
        lines += [f"Mean relative update ‖ΔW‖/‖W‖ per step over the first {d['steps']} steps (ratio to Adam):", "",
                  "| parameter | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for k in keys:
            a = runs[names[0]]["rel_update"][k]
            lines.append(f"| {k} | " + " | ".join(
                f"{runs[n]['rel_update'][k]:.2e}" + ("" if n == names[0] else f" ({runs[n]['rel_update'][k] / a:.2f}×)")
                for n in names) + " |")
        lines.append("")
    p = OUT / "cost.json"
    if p.exists():
        d = json.loads(p.read_text())
        m = d["median_s"]
        lines += ["## Step cost (round robin, median of %d steps; only the ratio is meaningful)" % d["steps"], "",
                  "| method | ms/step | × Adam |", "|---|---:|---:|"] + [
            f"| {n} | {1e3 * v:.1f} | {v / m['adam@3e-3']:.2f} |" for n, v in m.items()] + [""]
    for p in sorted(OUT.glob("momentum*.json")):
        d = json.loads(p.read_text())
        lines += [f"## Config() with rmsprop_tf1 momentum 0.999 (default) / 0.995 / 0.99 ({p.stem})", ""]
        for wname in MOMENTUM_STEPS:
            rows = [r for r in d["rows"] if r["workload"] == wname]
            if not rows:
                continue
            ts = rows[0]["targets"]
            lines += [f"### {wname} ({rows[0]['steps']} steps, eval every {rows[0]['eval_every']})", "",
                      "| method | " + " | ".join(f"steps to {t}" for t in ts) + " | best | final |",
                      "|---|" + "---:|" * (len(ts) + 2)]
            for r in rows:
                lines.append(f"| {r['name']} | " + " | ".join(_steps(r["to_target"], ts)) +
                             f" | {_fmt(r['best'])} | {_fmt(r['final'])}{' (diverged)' if r['diverged'] else ''} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--section", choices=("lm", "norm", "diag", "momentum", "cost"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--only", default="", help="comma-separated recipe (or workload, for momentum) names")
    p.add_argument("--data-dir", default="auto")
    p.add_argument("--tag", default="", help="suffix of the section's json (runs split over processes)")
    p.add_argument("--seed", type=int, default=0, help="model init seed (the batches stay the same)")
    p.add_argument("--momentum-steps", type=int, default=0, help="override the momentum section's step counts")
    p.add_argument("--report", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    OUT.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in a.only.split(",") if n.strip()] or None
    if a.section:
        sec = {"lm": lambda: section_lm(a.steps, a.eval_every, names, a.seed),
               "norm": lambda: section_norm(a.steps, a.eval_every, names),
               "diag": lambda: section_diag(min(a.steps, 40)),
               "cost": lambda: section_cost(names),
               "momentum": lambda: section_momentum(names, a.data_dir, a.momentum_steps)}[a.section]()
        (OUT / f"{a.section}{a.tag}.json").write_text(json.dumps(sec, indent=1))
    if a.report:
        _merge_tags()
        md = report()
        (OUT / "results.md").write_text(md)
        print(md)


def _merge_tags() -> None:
    """Merge SECTION-TAG.json files (one section split over two processes) into SECTION.json."""
    for sec in ("lm", "norm"):
        parts = sorted(OUT.glob(f"{sec}-*.json"))
        if not parts:
            continue
        base = json.loads(parts[0].read_text())
        for q in parts[1:]:
            base["rows"] += json.loads(q.read_text())["rows"]
        (OUT / f"{sec}.json").write_text(json.dumps(base, indent=1))


if __name__ == "__main__":
    main()
