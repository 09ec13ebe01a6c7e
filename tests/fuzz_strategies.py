"""The hypothesis strategies that draw :class:`fuzz_models.Spec` architectures for test_fuzz_identity.py (test
fixtures, not API). ``specs(rate)``: ``rate`` (tenths, per layer) sets how often the adversarial forms of
fuzz_extras.py (hooks, no_grad/detach side branches, parametrizations, detached weights/inputs) are drawn; 0 never.
"""
from __future__ import annotations

from hypothesis import strategies as st

import fuzz_extras as X
from fuzz_models import (ACTS, ADDMM_FORMS, FORMS, LINEAR_FORMS, OPTIONS, Act, Cat, Conv, Dense, Embed, Flatten, Side,
                         Spec, param_shape)
from lwcompile.config import PAIRS


# ---------------------------------------------------------------- the generator (simplest choice first: shrinks well)
@st.composite
def acts(draw, none_first: bool = False, modules: bool = False) -> Act:
    """``modules``: draw module spellings more often (they can carry hooks)."""
    name = draw(st.sampled_from(["none"] * (3 if none_first else 1) + ACTS))
    if name == "none":
        return Act()
    kw = tuple((k, draw(st.sampled_from(v))) for k, v in OPTIONS.get(name, {}).items())
    nn_forms = [f for f in FORMS[name] if f.startswith("nn")] * (2 if modules else 0)
    return Act(name, draw(st.sampled_from(FORMS[name] + nn_forms)), kw)


def _chance(draw, rate: int) -> bool:
    """True with probability rate/10 (rate 0: never); the False branch is hypothesis's simplest choice."""
    return rate > 0 and draw(st.integers(0, 9)) >= 10 - rate


@st.composite
def hooks(draw, sites: tuple, rate: int) -> tuple:
    """(site, "KIND:FN") pairs. In-place ``mul_`` only on a linear module's output (autograd may need an
    activation's output), and never in a pre-hook (it would change the caller's tensor); ``wmean`` (reads the
    module's weight) only on a linear module."""
    out = []
    while len(out) < 2 and _chance(draw, rate):
        site, kind = draw(st.sampled_from(sites)), draw(st.sampled_from(X.HOOK_KINDS))
        fns = [f for f in X.HOOK_FNS if site == "lin" or f not in ("mul_", "wmean")]
        fns = [f for f in fns if f != "mul_" or kind.startswith("fwd")]
        out.append((site, f"{kind}:{draw(st.sampled_from(fns))}"))
    return tuple(out)


@st.composite
def denses(draw, d_in: int, *, seq: bool, last: bool, earlier: tuple = (), d_out: int | None = None,
           forms: tuple = tuple(LINEAR_FORMS + ADDMM_FORMS), ties: int = 2, rate: int = 0) -> Dense:
    """``earlier``: (layer index, weight shape) of the layers a weight may be tied to; ``ties``: how many
    "no tie" entries to draw among; ``rate``: how often (in tenths) to add hooks, a parametrization, a detach."""
    free = d_out is None
    if free:
        d_out = draw(st.integers(2, 7) | st.just(d_in)) if 2 <= d_in <= 7 else draw(st.integers(2, 7))
    # drawn rich (rate >= 3): modules more often, so that more layers can carry parametrizations and module hooks
    form = draw(st.sampled_from(forms + (("nn.Linear", "Conv1D") * 2 + ("baddbmm",) if rate >= 3 else ())))
    if form == "baddbmm" and free and d_out % 2:  # two groups: even widths
        d_out = d_out - 1 if d_out > 2 else d_out + 1
    if form == "baddbmm" and (d_in % 2 or d_out % 2):
        form = "addmm"
    glue = ["mul_", "ln", "dropout_eval", "dropout_p0"] + ([] if seq else ["bn", "bn_eval"])
    skip = ["iadd", "add"] if d_out == d_in else []
    tie = [j for j, shape in earlier if shape == param_shape(form, d_in, d_out)]
    # an addmm form without a bias parameter is no block (a bias buffer, or torch.bmm): draw that less often
    bias = draw(st.sampled_from([True, True, False]) if form in ADDMM_FORMS else st.booleans())
    bias = bias or form == "Conv1D"  # HF's Conv1D always has one (a bias buffer: see the addmm forms)
    act = draw(acts(none_first=last, modules=rate >= 3))
    pre = tuple(draw(st.lists(st.sampled_from(glue + skip), unique=True, max_size=2)))
    post = tuple(draw(st.lists(st.sampled_from(glue[1:] + skip[1:]), unique=True, max_size=2)))
    freeze = "" if last else draw(st.sampled_from(["", "", "", "w", "b", "wb"]))
    tie = draw(st.sampled_from([None] * ties + tie)) if tie else None
    module = form in ("nn.Linear", "Conv1D")
    param = ""
    if module and tie is None and _chance(draw, rate):
        param = draw(st.sampled_from([p for p in X.PARAMS if p != "bias" or bias]))
        freeze = freeze.replace("b" if param == "bias" else "w", "")
    sites = ("unit",) + (("lin",) if module else ()) + (("act",) if act.form.startswith("nn") and act.name != "none"
                                                        else ())
    detach = ""
    if not last and _chance(draw, rate // 2):
        detach = draw(st.sampled_from(["in"] + ([] if module else ["w"])))
    return Dense(d_out, form, bias=bias, act=act, pre=pre, post=post, freeze=freeze, tie=tie,
                 hooks=draw(hooks(sites, rate)), param=param, detach=detach)


@st.composite
def sides(draw, d: int, *, seq: bool, rate: int) -> Side:
    branch = draw(denses(d, seq=seq, last=False, d_out=d, rate=rate))
    return Side(branch, draw(st.sampled_from(X.SIDE_MODES[:-1] * 2 + X.SIDE_MODES[-1:])),
                draw(st.sampled_from(["add", "gate"])),
                draw(st.booleans()))


def _conv_out(size: int, k: int, s: int, p, d: int, op: int, transpose: bool) -> int:
    if transpose:
        return (size - 1) * s - 2 * p + d * (k - 1) + op + 1
    if p == "same":
        return size
    return (size + 2 * (0 if p == "valid" else p) - d * (k - 1) - 1) // s + 1


@st.composite
def convs(draw, c_in: int, size: int, nd: int, rate: int = 0) -> tuple[Conv, int]:
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
    bias, act, freeze = draw(st.booleans()), draw(acts()), draw(st.sampled_from(["", "", "", "w", "b", "wb"]))
    param = ""
    if form == "nn" and _chance(draw, rate):
        param = draw(st.sampled_from([p for p in X.PARAMS if p != "orthogonal" and (p != "bias" or bias)]))
        freeze = freeze.replace("b" if param == "bias" else "w", "")
    sites = ("unit",) + (("lin",) if form == "nn" else ()) + (("act",) if act.form.startswith("nn") and
                                                             act.name != "none" else ())
    conv = Conv(c_out, k, s, p, d, groups, mode, transpose, op, form, bias, act, pre, tuple(post), freeze,
                hooks=draw(hooks(sites, rate)), param=param)
    return conv, cur


@st.composite
def specs(draw, rate: int = 1) -> Spec:
    """``rate``: how often (in tenths, per layer) hooks, parametrizations, detaches and side branches appear."""
    family = draw(st.sampled_from(["mlp", "mlp", "conv1d", "conv2d", "lm"]))
    layers, earlier, loss = [], [], "mse"
    if family == "mlp":
        seq = draw(st.sampled_from([None, None, 2, 3]))
        d = draw(st.integers(2, 7))
        in_shape = (seq, d) if seq else (d,)
        n = draw(st.integers(2, 5))
        for i in range(n):
            if i < n - 1 and draw(st.integers(0, 4)) == 0:
                a, b = (draw(denses(d, seq=bool(seq), last=False, rate=rate)) for _ in range(2))
                layers.append(Cat(a, b))
                d = a.d_out + b.d_out
                continue
            if i < n - 1 and _chance(draw, rate):
                layers.append(draw(sides(d, seq=bool(seq), rate=rate)))
                continue
            s = draw(denses(d, seq=bool(seq), last=i == n - 1, earlier=tuple(earlier), rate=rate))
            if not s.param:
                earlier.append((i, param_shape(s.form, d, s.d_out)))
            layers.append(s)
            d = s.d_out
        loss = "mse" if seq else draw(st.sampled_from(["mse", "mse", "ce"]))
    elif family == "lm":
        vocab, d = draw(st.integers(3, 7)), draw(st.integers(2, 7))
        in_shape = (draw(st.integers(2, 3)),)
        layers.append(Embed(vocab, d, draw(st.sampled_from(["nn", "F"]))))
        for _ in range(draw(st.integers(0, 2))):
            layers.append(draw(sides(d, seq=True, rate=rate)) if _chance(draw, rate) else
                          draw(denses(d, seq=True, last=False, d_out=d, rate=rate)))
        layers.append(draw(denses(d, seq=True, last=True, earlier=((0, (vocab, d)),), d_out=vocab, ties=1,
                                  forms=("nn.Linear", "nn.Linear", "F.linear", "x@W.T", "Conv1D"), rate=rate)))
        loss = draw(st.sampled_from(["mse", "ce"]))
    else:
        nd = int(family[4])
        c, size = draw(st.integers(1, 4)), draw(st.integers(4, 8) if nd == 1 else st.integers(3, 6))
        in_shape = (c, *[size] * nd)
        for _ in range(draw(st.integers(1, 3))):
            s, size = draw(convs(c, size, nd, rate))
            layers.append(s)
            c = s.c_out
        flat = draw(st.sampled_from([".flatten(1)", "torch.flatten", "nn.Flatten", ".reshape", "gap"]))
        d = c if flat == "gap" else c * size ** nd
        layers.append(Flatten(d, flat))
        n = draw(st.integers(1, 2))
        for i in range(n):
            s = draw(denses(d, seq=False, last=i == n - 1, rate=rate))
            layers.append(s)
            d = s.d_out
        loss = draw(st.sampled_from(["mse", "mse", "ce"]))
    root = draw(hooks(("root",), rate))
    if family == "lm":  # a pre-hook sees the integer tokens: the hooks skip them, so do not draw them
        root = tuple(h for h in root if h[1].startswith("fwd"))
    return Spec(family, in_shape, tuple(layers), batch=draw(st.integers(3, 6)), loss=loss,
                target=draw(st.sampled_from(list(PAIRS))),
                frontend=draw(st.sampled_from(["auto", "auto", "fx", "export"])),
                seed=draw(st.integers(0, 2 ** 16)), hooks=tuple(h for _, h in root))


# ---------------------------------------------------------------- what a spec exercises (for coverage checks)
FEATURES = ("fwd_hook", "pre_hook", "lin_hook", "act_hook", "root_hook", "no_grad", "detach", "param", "addmm",
            "Conv1D", "baddbmm")


def _units(layers: tuple):
    for s in layers:
        if isinstance(s, Cat):
            yield from (s.a, s.b)
        elif isinstance(s, Side):
            yield s.branch
        if isinstance(s, (Dense, Conv)):
            yield s


def features(spec: Spec) -> set[str]:
    """The adversarial forms (FEATURES, plus "param:NAME") that ``spec`` contains."""
    out = {"root_hook"} if spec.hooks else set()
    for s in spec.layers:
        if isinstance(s, Side):
            out.add("no_grad" if s.mode in ("nograd", "set_grad") else "detach" if "detach" in s.mode else "side")
    for u in _units(spec.layers):
        for site, hook in u.hooks:
            out |= {"pre_hook" if hook.startswith("pre") else "fwd_hook"} | ({f"{site}_hook"} - {"unit_hook"})
        if u.param:
            out |= {"param", f"param:{u.param}"}
        if getattr(u, "detach", ""):
            out.add("detach")
        form = getattr(u, "form", "")
        if form in ADDMM_FORMS:
            out.add("addmm" if "addmm" in form and form != "baddbmm" else form)
    return out
