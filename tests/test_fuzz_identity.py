"""METHOD.md's SGD identity on generated architectures (property-based; models from tests/fuzz_models.py).

With T=1, plain GD of step η and every (target, local_loss) pair, one compiled step must equal one
torch.optim.SGD(lr=η·γ) step (float64: each parameter's update within 1e-9 of SGD's, relative to SGD's update;
buffers within 1e-12), frozen parameters must stay bit-identical, and a model lwcompile cannot handle must be
refused with an LwcompileError at transform / first step, leaving the model exactly as it was.

Knobs (environment): LWCOMPILE_FUZZ_EXAMPLES=N (default 40 generated models), LWCOMPILE_FUZZ_SHRINK=1 (let
hypothesis shrink a failure: slower, smaller example), LWCOMPILE_FUZZ_SURVEY=1 (run all N, then fail once
listing every failing spec; run with -s to see the per-example log). Reproduce one spec with
``fuzz_models.build(eval("Spec(...)", vars(fuzz_models)))``.
"""
from __future__ import annotations

import copy
import math
import os
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from torch import nn

import fuzz_models
import lwcompile
from fuzz_models import ACTS, FORMS, LINEAR_FORMS, OPTIONS, Act, Cat, Conv, Dense, Embed, Flatten, Spec, param_shape
from lwcompile.config import PAIRS

ETA, GAMMA = 0.05, 0.5
N_EXAMPLES = int(os.environ.get("LWCOMPILE_FUZZ_EXAMPLES", "40"))
SHRINK = os.environ.get("LWCOMPILE_FUZZ_SHRINK") == "1"
SURVEY = os.environ.get("LWCOMPILE_FUZZ_SURVEY") == "1"


def _snapshot(model: nn.Module) -> tuple[dict, dict]:
    return ({n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)},
            {n: b.detach().clone() for n, b in model.named_buffers(remove_duplicate=False)})


def sgd_reference(model, inputs, y, loss_fn, lr):
    """One torch.optim.SGD step on a deep copy (tied weights stay tied; frozen ones get no gradient)."""
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    loss = loss_fn(ref(*inputs), y)
    if loss.requires_grad:
        loss.backward()
        opt.step()
    return ref, loss.item()


def check_identity(model, inputs, y, loss_fn, target: str, frontend: str = "auto", oracle_lr: float = ETA * GAMMA):
    """"ok", or the LwcompileError that refused the model. Raises AssertionError on any violation of the
    identity; any exception other than an LwcompileError propagates (and fails the test)."""
    params0, buffers0 = _snapshot(model)
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    ref, ref_loss = sgd_reference(model, inputs, y, loss_fn, oracle_lr)
    cfg = lwcompile.Config(target=target, local_loss=PAIRS[target], gamma=GAMMA, steps=1, inner_optimizer="gd",
                           inner_lr=ETA, outer_optimizer="sgd", outer_lr=ETA * GAMMA, frontend=frontend,
                           fuse=True)  # identical blocks run fused (passes/fuse.py): the identity must hold so too
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = lwcompile.transform(model, loss_fn, inputs, cfg)
            loss = prog.step(inputs, y)
    except lwcompile.LwcompileError as e:
        params, buffers = _snapshot(model)
        changed = [n for n in params if not torch.equal(params[n], params0[n])]
        changed += [n for n in buffers if not torch.equal(buffers[n], buffers0[n])]
        assert not changed, f"refused ({type(e).__name__}: {_first_line(e)}) but changed {changed}"
        assert str(e).strip(), f"{type(e).__name__} without a message"
        return e
    errors = []
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    for n, p in model.named_parameters(remove_duplicate=False):
        p0, p1, r = params0[n], p.detach(), ref_params[n].detach()
        if n in frozen:
            if not torch.equal(p1, p0):
                errors.append(f"{n}: frozen (requires_grad=False) but moved by {(p1 - p0).abs().max().item():.3g}")
            continue
        du, du_ref = p1 - p0, r - p0
        scale, err = du_ref.abs().max().item(), (du - du_ref).abs().max().item()
        if not err <= 1e-9 * scale + 1e-14:  # the floor: SGD's update ~0 (e.g. a bias cancelled by BatchNorm)
            rel = err / scale if scale > 0 else math.inf
            errors.append(f"{n}: |update - SGD's| = {err:.3g} = {rel:.3g} x |SGD's update| ({scale:.3g})")
    now_frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    if now_frozen != frozen:
        errors.append(f"requires_grad flags changed: frozen before {sorted(frozen)}, after {sorted(now_frozen)}")
    ref_buffers = dict(ref.named_buffers(remove_duplicate=False))
    for n, b in model.named_buffers(remove_duplicate=False):
        rb = ref_buffers[n]
        if b.shape != rb.shape or not torch.allclose(b, rb, rtol=1e-12, atol=1e-12):
            errors.append(f"buffer {n}: differs from SGD's by {(b.double() - rb.double()).abs().max().item():.3g}")
    if not abs(loss - ref_loss) <= 1e-10 * abs(ref_loss) + 1e-14:
        errors.append(f"loss {loss!r} != reference loss {ref_loss!r}")
    assert not errors, f"SGD identity violated ({target}, front end {prog.frontend}):\n  " + "\n  ".join(errors)
    return "ok"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


# ---------------------------------------------------------------- the generator (simplest choice first: shrinks well)
@st.composite
def acts(draw, none_first: bool = False) -> Act:
    name = draw(st.sampled_from(["none"] * (3 if none_first else 1) + ACTS))
    if name == "none":
        return Act()
    kw = tuple((k, draw(st.sampled_from(v))) for k, v in OPTIONS.get(name, {}).items())
    return Act(name, draw(st.sampled_from(FORMS[name])), kw)


@st.composite
def denses(draw, d_in: int, *, seq: bool, last: bool, earlier: tuple = (), d_out: int | None = None,
           forms: tuple = tuple(LINEAR_FORMS), ties: int = 2) -> Dense:
    """``earlier``: (layer index, weight shape) of the layers a weight may be tied to; ``ties``: how many
    "no tie" entries to draw among."""
    if d_out is None:
        d_out = draw(st.integers(2, 7) | st.just(d_in)) if 2 <= d_in <= 7 else draw(st.integers(2, 7))
    form = draw(st.sampled_from(forms))
    glue = ["mul_", "ln", "dropout_eval", "dropout_p0"] + ([] if seq else ["bn", "bn_eval"])
    skip = ["iadd", "add"] if d_out == d_in else []
    tie = [j for j, shape in earlier if shape == param_shape(form, d_in, d_out)]
    return Dense(
        d_out, form, bias=draw(st.booleans()), act=draw(acts(none_first=last)),
        pre=tuple(draw(st.lists(st.sampled_from(glue + skip), unique=True, max_size=2))),
        post=tuple(draw(st.lists(st.sampled_from(glue[1:] + skip[1:]), unique=True, max_size=2))),
        freeze="" if last else draw(st.sampled_from(["", "", "", "w", "b", "wb"])),
        tie=draw(st.sampled_from([None] * ties + tie)) if tie else None)


def _conv_out(size: int, k: int, s: int, p, d: int, op: int, transpose: bool) -> int:
    if transpose:
        return (size - 1) * s - 2 * p + d * (k - 1) + op + 1
    if p == "same":
        return size
    return (size + 2 * (0 if p == "valid" else p) - d * (k - 1) - 1) // s + 1


@st.composite
def convs(draw, c_in: int, size: int, nd: int) -> tuple[Conv, int]:
    """A conv layer valid for (c_in, size^nd) inputs, and its output size (at most 10)."""
    transpose = draw(st.sampled_from([False, False, False, True]))
    c_out = draw(st.integers(1, 7))
    groups = draw(st.sampled_from([g for g in range(1, 8) if c_in % g == 0 and c_out % g == 0]))
    k, s, d = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    if transpose:
        mode, p, op = "zeros", draw(st.integers(0, 2)), draw(st.integers(0, 1))
        op = op if op < max(s, d) else 0
        if _conv_out(size, k, s, p, d, op, True) > 10:
            s, op = 1, 0
        if _conv_out(size, k, s, p, d, op, True) < 1:
            p = 0
    else:
        mode, p, op = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])), draw(
            st.sampled_from([0, 1, 2, "same", "valid"])), 0
        s = 1 if p == "same" else s
        if _conv_out(size, k, s, p, d, 0, False) < 1:
            k = d = 1
        if mode != "zeros" and (p == "same" and d * (k - 1) >= size or isinstance(p, int) and p >= size):
            mode = "zeros"  # reflect/circular padding must be smaller than the input
        if _conv_out(size, k, s, p, d, 0, False) > 10:
            p = 0
    out = _conv_out(size, k, s, p, d, op, transpose)
    form = draw(st.sampled_from(["nn", "F", "F(kw)"])) if mode == "zeros" else "nn"
    skip = ["iadd", "add"] if c_out == c_in and out == size else []
    glue = ["bn", "bn_eval", "dropout_eval"]
    pre = tuple(draw(st.lists(st.sampled_from(["mul_"] + glue + skip), unique=True, max_size=2)))
    post, cur = [], out
    for _ in range(draw(st.integers(0, 2))):
        choices = [g for g in glue + (["add"] if skip and cur == size else [])
                   + (["maxpool", "avgpool", "F.maxpool", "F.avgpool"] if cur >= 2 else []) if g not in post]
        post.append(draw(st.sampled_from(choices)))
        cur = cur // 2 if post[-1].endswith("pool") else cur
    conv = Conv(c_out, k, s, p, d, groups, mode, transpose, op, form, draw(st.booleans()), draw(acts()), pre,
                tuple(post), draw(st.sampled_from(["", "", "", "w", "b", "wb"])))
    return conv, cur


@st.composite
def specs(draw) -> Spec:
    family = draw(st.sampled_from(["mlp", "mlp", "conv1d", "conv2d", "lm"]))
    layers, earlier, loss = [], [], "mse"
    if family == "mlp":
        seq = draw(st.sampled_from([None, None, 2, 3]))
        d = draw(st.integers(2, 7))
        in_shape = (seq, d) if seq else (d,)
        n = draw(st.integers(2, 5))
        for i in range(n):
            if i < n - 1 and draw(st.integers(0, 4)) == 0:
                a, b = (draw(denses(d, seq=bool(seq), last=False)) for _ in range(2))
                layers.append(Cat(a, b))
                d = a.d_out + b.d_out
                continue
            s = draw(denses(d, seq=bool(seq), last=i == n - 1, earlier=tuple(earlier)))
            earlier.append((i, param_shape(s.form, d, s.d_out)))
            layers.append(s)
            d = s.d_out
        loss = "mse" if seq else draw(st.sampled_from(["mse", "mse", "ce"]))
    elif family == "lm":
        vocab, d = draw(st.integers(3, 7)), draw(st.integers(2, 7))
        in_shape = (draw(st.integers(2, 3)),)
        layers.append(Embed(vocab, d, draw(st.sampled_from(["nn", "F"]))))
        for _ in range(draw(st.integers(0, 2))):
            layers.append(draw(denses(d, seq=True, last=False, d_out=d)))
        layers.append(draw(denses(d, seq=True, last=True, earlier=((0, (vocab, d)),), d_out=vocab, ties=1,
                                  forms=("nn.Linear", "nn.Linear", "F.linear", "x@W.T"))))
        loss = draw(st.sampled_from(["mse", "ce"]))
    else:
        nd = int(family[4])
        c, size = draw(st.integers(1, 4)), draw(st.integers(4, 8) if nd == 1 else st.integers(3, 6))
        in_shape = (c, *[size] * nd)
        for _ in range(draw(st.integers(1, 3))):
            s, size = draw(convs(c, size, nd))
            layers.append(s)
            c = s.c_out
        flat = draw(st.sampled_from([".flatten(1)", "torch.flatten", "nn.Flatten", ".reshape", "gap"]))
        d = c if flat == "gap" else c * size ** nd
        layers.append(Flatten(d, flat))
        n = draw(st.integers(1, 2))
        for i in range(n):
            s = draw(denses(d, seq=False, last=i == n - 1))
            layers.append(s)
            d = s.d_out
        loss = draw(st.sampled_from(["mse", "mse", "ce"]))
    return Spec(family, in_shape, tuple(layers), batch=draw(st.integers(3, 6)), loss=loss,
                target=draw(st.sampled_from(list(PAIRS))),
                frontend=draw(st.sampled_from(["auto", "auto", "fx", "export"])),
                seed=draw(st.integers(0, 2 ** 16)))


# ---------------------------------------------------------------- generated architectures
def test_generated_models_satisfy_the_identity_or_are_refused():
    failures = []

    @settings(max_examples=N_EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=False,
              phases=(Phase.explicit, Phase.generate) + ((Phase.shrink,) if SHRINK else ()),
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(spec=specs())
    def run(spec):
        try:
            model, inputs, y, loss_fn = fuzz_models.build(spec)
            outcome = check_identity(model, inputs, y, loss_fn, spec.target, spec.frontend)
        except Exception as e:
            if not SURVEY:
                raise
            failures.append((spec, e))
            print(f"FAIL {spec!r}\n     {type(e).__name__}: {_first_line(e)}", flush=True)
            return
        event("ok" if outcome == "ok" else f"refused: {type(outcome).__name__}")
        if SURVEY:
            print(f"{'ok  ' if outcome == 'ok' else 'REF '} {spec!r}" +
                  ("" if outcome == "ok" else f"\n     {type(outcome).__name__}: {_first_line(outcome)}"), flush=True)

    run()
    assert not failures, f"{len(failures)} of {N_EXAMPLES} generated models failed:\n" + "\n".join(
        f"{s!r}\n    {type(e).__name__}: {str(e).strip()[:600]}" for s, e in failures)


@pytest.mark.parametrize("name", ACTS)
def test_every_spelling_of_each_transfer_function(name):
    """One MLP per transfer function chaining all its spellings (module, inplace module, functions, methods),
    with its non-default options; the (target, loss) pair rotates with the function."""
    kw = tuple((k, v[-1]) for k, v in OPTIONS.get(name, {}).items())
    layers = tuple(Dense(4, act=Act(name, form, kw)) for form in FORMS[name]) + (Dense(3),)
    spec = Spec("mlp", (4,), layers, batch=5, seed=ACTS.index(name))
    target = list(PAIRS)[ACTS.index(name) % 4]
    outcome = check_identity(*fuzz_models.build(spec), target)
    assert outcome == "ok", f"{spec!r} refused: {type(outcome).__name__}: {outcome}"


# ---------------------------------------------------------------- the bug report's reproductions
class MulInplace(nn.Module):  # (a)
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.fc1(x)
        h.mul_(2.0)
        return self.fc2(torch.tanh(h))


class ResidualInplace(nn.Module):  # (d)
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc1(x)
        h += x
        return self.fc2(torch.tanh(h))


class TiedLM(nn.Module):  # (g)
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.out = nn.Linear(4, 7)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        return self.out(self.emb(tokens))


class KeywordLinear(nn.Module):  # (h)
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(5, 4) * 0.5)
        self.w2 = nn.Parameter(torch.randn(3, 5) * 0.5)
        self.b2 = nn.Parameter(torch.randn(3) * 0.1)

    def forward(self, x):
        h = torch.tanh(F.linear(input=x, weight=self.w1))
        return F.linear(input=h, weight=self.w2, bias=self.b2)


def _mlp(act: nn.Module, freeze: str = "") -> nn.Module:
    m = nn.Sequential(nn.Linear(4, 5), act, nn.Linear(5, 3))
    if freeze:
        getattr(m[0], freeze).requires_grad_(False)
    return m


REPROS = {  # name -> (model factory, front end)
    "a-mul_-then-tanh": (MulInplace, "auto"),
    "b-hardswish-inplace": (lambda: _mlp(nn.Hardswish(inplace=True)), "auto"),
    "c-silu-inplace-export": (lambda: _mlp(nn.SiLU(inplace=True)), "export"),
    "d-iadd-residual-export": (ResidualInplace, "export"),
    "d-iadd-residual-fx": (ResidualInplace, "fx"),
    "e-frozen-bias": (lambda: _mlp(nn.Tanh(), freeze="bias"), "auto"),
    "f-frozen-weight-trainable-bias": (lambda: _mlp(nn.Tanh(), freeze="weight"), "auto"),
    "g-tied-embedding-lm-head": (TiedLM, "auto"),
    "h-F.linear-keyword-args": (KeywordLinear, "auto"),
}


@pytest.mark.parametrize("target", list(PAIRS))
@pytest.mark.parametrize("name", list(REPROS))
def test_bug_report_reproduction(name, target):
    factory, frontend = REPROS[name]
    model = factory().double()
    if name.startswith("g-"):
        inputs, loss_fn = (torch.randint(0, 7, (4, 3)),), fuzz_models.seq_cross_entropy
        y = torch.randint(0, 7, (4, 3))
    else:
        inputs, loss_fn = (torch.randn(5, 4, dtype=torch.float64),), F.mse_loss
        y = torch.randn(5, 3, dtype=torch.float64)
    outcome = check_identity(model, inputs, y, loss_fn, target, frontend)
    if name.startswith("g-") and outcome != "ok":  # acceptable: a PartitionError that names both uses
        msg = str(outcome)
        assert isinstance(outcome, lwcompile.PartitionError), f"{type(outcome).__name__}: {msg}"
        assert {"emb", "out"} <= set(re.findall(r"\w+", msg)), f"does not name both uses: {msg}"
        return
    assert outcome == "ok", f"refused: {type(outcome).__name__}: {outcome}"


# ---------------------------------------------------------------- the checker itself can fail
def test_checker_rejects_an_update_that_is_not_sgds():
    model, inputs, y, loss_fn = fuzz_models.build(Spec("mlp", (4,), (Dense(5, act=Act("tanh")), Dense(3))))
    assert check_identity(copy.deepcopy(model), inputs, y, loss_fn, "md_post") == "ok"
    with pytest.raises(AssertionError, match="SGD identity violated"):
        check_identity(model, inputs, y, loss_fn, "md_post", oracle_lr=ETA * GAMMA * (1 + 1e-7))
