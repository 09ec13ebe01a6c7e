"""The transfer functions past the paper's, and lwcompile.register_transfer, as specifications.

- every spelling of each (module, torch.nn.functional, torch.*, ATen via torch.export) is found as the block's f;
- with T=1 and plain GD, one compiled step equals torch.optim.SGD(lr=ηγ) in float64 for each of them;
- F(z) − F(0) is ∫₀ᶻ f to mpmath's precision;
- a user-registered transfer is found, used, validated and exported (or refused) like a built-in one.
"""
import copy

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import lwcompile
from lwcompile.errors import ConfigError, ExportError
from lwcompile.passes.onnx_training import artifact_supported, export_training_artifacts
from lwcompile.passes.partition import partition
from lwcompile.passes.trace import trace
from lwcompile.passes.transfer import (BUILTIN_TRANSFERS, TRANSFERS, TransferRow, add_transfer_row,
                                       remove_transfer_row, transfer_for)
from lwcompile.passes.transfer_rows import BUILTIN_ROWS
from lwcompile.passes.transfer_rows.paper import li2_neg_exp
from lwcompile.transfers import registered_transfers, unregister_transfer

ETA, GAMMA = 0.05, 0.5
OPTS = {"hardtanh": {"min_val": -1.5, "max_val": 0.8}, "celu": {"alpha": 0.7}}
# every spelling a model can use; torch.Tensor has no method for any of these (their rows have no methods)
FORMS = {
    "hardtanh": {"module": nn.Hardtanh(-1.5, 0.8), "functional": lambda x: F.hardtanh(x, -1.5, 0.8),
                 "functional_kw": lambda x: F.hardtanh(x, min_val=-1.5, max_val=0.8)},
    "relu6": {"module": nn.ReLU6(), "functional": F.relu6},
    "hardsigmoid": {"module": nn.Hardsigmoid(), "functional": F.hardsigmoid},
    "hardswish": {"module": nn.Hardswish(), "functional": F.hardswish},
    "selu": {"module": nn.SELU(), "functional": F.selu, "torch": torch.selu},
    "celu": {"module": nn.CELU(0.7), "functional": lambda x: F.celu(x, 0.7),
             "torch": lambda x: torch.celu(x, alpha=0.7)},
    "mish": {"module": nn.Mish(), "functional": F.mish},
    "logsigmoid": {"module": nn.LogSigmoid(), "functional": F.logsigmoid},
    "softsign": {"module": nn.Softsign(), "functional": F.softsign},
}
CASES = [(t, form) for t, forms in FORMS.items() for form in forms]


class Net(nn.Module):
    """Linear → act → Linear; ``act`` a module (a submodule) or a function (called as such)."""

    def __init__(self, act) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 7), act, nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # wide inputs: with fc1's seed-0 init, pre-activations fall in every piece (below −3, above 6, ...)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64) * 5
    return x, torch.randn(16, 3, generator=g, dtype=torch.float64)


def _assert_one_step_is_sgd(model: nn.Module, x, y, target: str, frontend: str = "auto",
                            transfer: str = "") -> lwcompile.Program:
    """METHOD.md's oracle, as tests/test_sgd_identity.py states it: relative update error < 1e-9 in float64."""
    model = model.double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=ETA * GAMMA)
    F.mse_loss(ref(x), y).backward()
    opt.step()
    cfg = lwcompile.Config(target=target, local_loss=lwcompile.config.PAIRS[target], gamma=GAMMA, steps=1,
                           inner_optimizer="gd", inner_lr=ETA, outer_optimizer="sgd", outer_lr=ETA * GAMMA,
                           frontend=frontend)
    prog = lwcompile.transform(model, F.mse_loss, (x,), cfg)
    if transfer:
        assert prog.blocks[0].transfer == transfer
    prog.step((x,), y)
    for (n, p0), p, r in zip(before.items(), model.parameters(), ref.parameters()):
        du, du_ref = p.detach() - p0, r.detach() - p0
        assert du_ref.abs().max() > 0, n
        err = ((du - du_ref).abs().max() / du_ref.abs().max()).item()
        assert err < 1e-9, (n, err)
    return prog


# ------------------------------------------------------------------------------------------------ recognition
def _found(act, frontend: str = "auto") -> tuple[str, dict]:
    """(transfer, options) of the first block, from the trace and partition passes (what transform runs first)."""
    model, x = Net(act), torch.randn(5, 4)
    res = trace(model, (x,), frontend)
    assert res.frontend == {"auto": "torch.fx.symbolic_trace", "export": "torch.export"}[frontend]
    blocks = partition(res.graph_module, (x,)).blocks
    assert [b.transfer for b in blocks[1:]] == ["identity"]
    return blocks[0].transfer, dict(blocks[0].transfer_kwargs)


@pytest.mark.parametrize("transfer,form", CASES)
def test_each_spelling_is_the_blocks_transfer_with_its_options(transfer, form):
    assert _found(FORMS[transfer][form]) == (transfer, OPTS.get(transfer, {}))


# ------------------------------------------------------------------------------------------------ SGD identity
@pytest.mark.parametrize("target", ["md_post", "gd_post"])
@pytest.mark.parametrize("transfer,form", CASES)
def test_one_step_with_T1_equals_sgd_for_every_new_transfer(transfer, form, target):
    x, y = _data()
    _assert_one_step_is_sgd(Net(FORMS[transfer][form]), x, y, target, transfer=transfer)


# torch.export spells nn.ReLU6 as hardtanh(0, 6) (the same f) and F.softsign as x / (1 + |x|): three ATen ops and
# no single node, so that block is identity (and the identity still holds).
EXPORTED = {("relu6", "module"): ("hardtanh", {"min_val": 0.0, "max_val": 6.0}),
            ("softsign", "functional"): ("identity", {})}


# modules export to the same ATen ops as their F functions, nn.ReLU6 aside
@pytest.mark.parametrize("transfer,form", [(t, "functional") for t in FORMS] + [("relu6", "module")])
def test_the_aten_overloads_torch_export_produces_are_recognised_and_keep_the_identity(transfer, form):
    want = EXPORTED.get((transfer, form), (transfer, OPTS.get(transfer, {})))
    x, y = _data(1)
    prog = _assert_one_step_is_sgd(Net(FORMS[transfer][form]), x, y, "md_post", "export", want[0])
    assert prog.frontend == "torch.export" and dict(prog.blocks[0].transfer_kwargs) == want[1]


# ------------------------------------------------------------------------------------------------ potentials
def _mp_f(transfer: str):
    a, sa, ss = mpmath.mpf(0.7), mpmath.mpf("1.6732632423543772848170429916717"), \
        mpmath.mpf("1.0507009873554804934193349852946")
    return {
        "hardtanh": lambda t: min(max(t, mpmath.mpf(-1.5)), mpmath.mpf(0.8)),
        "relu6": lambda t: min(max(t, 0), 6),
        "hardsigmoid": lambda t: min(max(t + 3, 0), 6) / 6,
        "hardswish": lambda t: t * min(max(t + 3, 0), 6) / 6,
        "selu": lambda t: ss * (t if t > 0 else sa * mpmath.expm1(t)),
        "celu": lambda t: t if t > 0 else a * mpmath.expm1(t / a),
        "mish": lambda t: t * mpmath.tanh(mpmath.log1p(mpmath.exp(t))),
        "logsigmoid": lambda t: -mpmath.log1p(mpmath.exp(-t)),
        "softsign": lambda t: t / (1 + abs(t)),
    }[transfer]


KINKS = {"hardtanh": (-1.5, 0.8), "relu6": (0, 6), "hardsigmoid": (-3, 3), "hardswish": (-3, 3)}


@pytest.mark.parametrize("transfer", list(FORMS))
def test_F_is_the_integral_of_f_to_mpmath_precision(transfer):
    t, kw, f = TRANSFERS[transfer], OPTS.get(transfer, {}), _mp_f(transfer)
    zs = [-60.0, -30.0, -7.5, -3.0, -1.2, -0.01, 0.0, 0.3, 2.0, 3.0, 6.5, 17.0, 40.0]
    got = t.F(torch.tensor(zs, dtype=torch.float64), kw) - t.F(torch.zeros((), dtype=torch.float64), kw)
    for z, g in zip(zs, got.tolist()):
        lo, hi = min(0.0, z), max(0.0, z)
        pts = [lo] + [k for k in KINKS.get(transfer, ()) if lo < k < hi] + [hi]  # split at the kinks
        with mpmath.workdps(30):
            ref = float(mpmath.quad(f, pts)) * (1 if z >= 0 else -1)
        assert g == pytest.approx(ref, rel=1e-12, abs=1e-12), z


def test_potentials_are_traceable_and_keep_float32():
    z = torch.randn(3, 5)
    for name in FORMS:
        t, kw = TRANSFERS[name], OPTS.get(name, {})
        out = make_fx(lambda v: t.F(v, kw))(z)(z)
        assert out.dtype == torch.float32 and out.shape == z.shape, name
        torch.testing.assert_close(out, t.F(z, kw))


# ------------------------------------------------------------------------------------------------ ONNX training
# mish and logsigmoid have f but no F in ONNX (a quadrature, a dilogarithm): no matching / dual Bregman rows
ONNX_ROWS = ([(t, "squared_post") for t in FORMS] + [(t, "matching") for t in FORMS if t not in ("mish", "logsigmoid")]
             + [("celu", "dual_bregman"), ("hardswish", "dual_bregman")])


@pytest.mark.parametrize("transfer,local_loss", ONNX_ROWS)
def test_training_artifacts_of_the_new_transfers_match_torch(tmp_path, transfer, local_loss):
    from lwcompile.passes.local_losses import value
    from lwcompile.runtime.ort import OrtTrainingBlock
    w, b, x = torch.randn(5, 4) * 0.8, torch.randn(5), torch.randn(12, 4) * 2.5
    t, kw = torch.randn(12, 5), OPTS.get(transfer, {})
    export_training_artifacts("linear", w, b, x, t, transfer, local_loss, 0.0, "sgd", str(tmp_path / "a"),
                              transfer_kwargs=kw)
    got = OrtTrainingBlock(str(tmp_path / "a")).train(x, t, steps=3, lr=0.01)
    W, B = w.double().requires_grad_(), b.double().requires_grad_()
    for _ in range(3):
        gW, gB = torch.autograd.grad(value(local_loss, transfer, kw, x.double() @ W.T + B, t.double()), [W, B])
        W, B = (W - 0.01 * gW).detach().requires_grad_(), (B - 0.01 * gB).detach().requires_grad_()
    for name, ref in (("weight", W), ("bias", B)):
        r = ref.detach().numpy()
        assert np.abs(got[name] - r).max() <= 1e-4 * np.abs(r).max(), name


@pytest.mark.parametrize("transfer", ["mish", "logsigmoid"])
def test_training_artifacts_refuse_a_matching_loss_without_an_onnx_potential(tmp_path, transfer):
    with pytest.raises(ExportError, match=f"transfer '{transfer}' not supported with the matching loss"):
        export_training_artifacts("linear", torch.randn(3, 2), None, torch.randn(4, 2), torch.randn(4, 3),
                                  transfer, "matching", out_dir=str(tmp_path / "a"))


# ------------------------------------------------------------------------------------------------ register_transfer
def swish2(x):
    """x·σ(2x): a user's activation, a plain function kept whole by symbolic tracing (torch.fx.wrap below)."""
    return x * torch.sigmoid(2 * x)


torch.fx.wrap("swish2")


def swish2_F(z):
    """∫₀ᶻ t·σ(2t) dt = (S(2z) − S(0))/4 with S(u) = u·softplus(u) + Li₂(−eᵘ), SiLU's potential."""
    u = 2 * z
    return (u * F.softplus(u) + li2_neg_exp(u) - li2_neg_exp(torch.zeros_like(u))) / 4


class Swish2(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(2 * x)


class Swish(nn.Module):
    """x·σ(βx) with an option read from the module, as nn.ELU's alpha is."""

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, x):
        return swish_beta(x, self.beta)


def swish_beta(x, beta=1.0):
    return x * torch.sigmoid(beta * x)


torch.fx.wrap("swish_beta")


@torch.library.custom_op("lwtest::swish2", mutates_args=())
def swish2_op(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(2 * x)


swish2_op.register_fake(lambda x: torch.empty_like(x))


def _swish2_op_backward(ctx, grad):
    x, = ctx.saved_tensors
    s = torch.sigmoid(2 * x)
    return grad * (s + 2 * x * s * (1 - s))


swish2_op.register_autograd(_swish2_op_backward, setup_context=lambda ctx, inputs, output: ctx.save_for_backward(
    inputs[0]))


class WrappedNet(Net):
    """Calls swish2 by its global name: what torch.fx.wrap patches while tracing."""

    def __init__(self) -> None:
        super().__init__(nn.Identity())

    def forward(self, x):
        return self.fc2(swish2(self.fc1(x)))


class CustomOpNet(WrappedNet):
    def forward(self, x):
        return self.fc2(swish2_op(self.fc1(x)))


@pytest.fixture(autouse=True)
def _forget_registrations():
    before = set(registered_transfers())
    yield
    for name in set(registered_transfers()) - before:
        unregister_transfer(name)


@pytest.mark.parametrize("target", ["md_post", "gd_post"])
def test_a_registered_module_is_a_block_transfer_and_keeps_the_sgd_identity(target):
    lwcompile.register_transfer("swish2", swish2, swish2_F, modules=(Swish2,))
    x, y = _data(2)  # the tracer keeps a registered transfer module whole (a leaf), so the partitioner can match it
    _assert_one_step_is_sgd(Net(Swish2()), x, y, target, transfer="swish2")


@pytest.mark.parametrize("target", ["md_post", "gd_post"])
def test_a_registered_wrapped_function_is_a_block_transfer_and_keeps_the_sgd_identity(target):
    lwcompile.register_transfer("swish2", swish2, swish2_F, functions=(swish2,))
    x, y = _data(3)
    _assert_one_step_is_sgd(WrappedNet(), x, y, target, transfer="swish2")


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_registered_custom_op_is_found_by_both_front_ends(frontend):
    lwcompile.register_transfer("swish2", swish2, swish2_F, functions=(swish2_op, torch.ops.lwtest.swish2.default))
    x, y = _data(4)
    _assert_one_step_is_sgd(CustomOpNet(), x, y, "gd_post", frontend, transfer="swish2")


def test_options_come_from_module_attributes_and_reach_f():
    lwcompile.register_transfer("swish", swish_beta, lambda z, beta=1.0: swish2_F(beta * z / 2) * 4 / beta ** 2,
                                functions=(swish_beta,), options=("beta",))
    x, y = _data(5)
    prog = lwcompile.transform(Net(Swish(1.7)).double(), F.mse_loss, (x,))
    assert (prog.blocks[0].transfer, prog.blocks[0].transfer_kwargs) == ("swish", (("beta", 1.7),))
    for target in ("md_post", "gd_post"):
        _assert_one_step_is_sgd(Net(Swish(1.7)), x, y, target, transfer="swish")


def test_default_fprime_is_autograd_and_an_explicit_one_is_used():
    lwcompile.register_transfer("swish2", swish2, swish2_F, functions=(swish2,))
    z, v = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    zr = z.clone().requires_grad_(True)
    auto, = torch.autograd.grad(swish2(zr), zr, v)
    with torch.no_grad():  # torch.func.vjp does not need grad mode
        torch.testing.assert_close(TRANSFERS["swish2"].vjp(z, v, {}), auto, rtol=1e-14, atol=0)
    s = lambda t: torch.sigmoid(2 * t)  # noqa: E731
    lwcompile.register_transfer("swish2", swish2, swish2_F, lambda t: s(t) + 2 * t * s(t) * (1 - s(t)),
                                functions=(swish2,), replace=True)
    torch.testing.assert_close(TRANSFERS["swish2"].vjp(z, v, {}), auto, rtol=1e-12, atol=1e-14)
    # and F is an antiderivative of f
    t = TRANSFERS["swish2"]
    for a in (-6.0, -0.4, 0.9, 7.0):
        ref = float(mpmath.quad(lambda u: u / (1 + mpmath.exp(-2 * u)), [0, a]))
        assert float(t.F(torch.tensor(a, dtype=torch.float64), {})) == pytest.approx(ref, rel=1e-12, abs=1e-13)


def test_unregister_removes_every_entry():
    lwcompile.register_transfer("swish2", swish2, swish2_F, modules=(Swish2,), functions=(swish2,),
                                methods=("swish2_method",))
    row = TRANSFERS["swish2"]
    assert transfer_for("module", Swish2) is transfer_for("function", swish2) is transfer_for("method", "swish2_method")
    assert transfer_for("module", Swish2) is row and row.name == "swish2"
    unregister_transfer("swish2")
    assert "swish2" not in TRANSFERS and transfer_for("module", Swish2) is None
    assert transfer_for("function", swish2) is None and transfer_for("method", "swish2_method") is None
    with pytest.raises(ConfigError, match="no registered transfer 'swish2'"):
        unregister_transfer("swish2")
    with pytest.raises(ConfigError, match="built in"):
        unregister_transfer("relu")


def _bad(**over):
    kw = dict(name="mine", f=swish2, F=swish2_F, functions=(swish2,))
    kw.update(over)
    return kw


@pytest.mark.parametrize("kwargs,message", [
    (_bad(name="relu"), "built-in"),
    (_bad(name="my act"), "identifier"),
    (_bad(name=3), "identifier"),
    (_bad(f=3), "f must be callable"),
    (_bad(F=None), "f and F are required"),
    (_bad(fprime="x"), "fprime must be callable"),
    (_bad(functions=swish2), "take tuples"),
    (_bad(modules=(int,)), "nn.Module subclasses"),
    (_bad(functions=(Swish2,)), "pass module classes as modules="),
    (_bad(functions=(F.relu,)), "already the transfer 'relu'"),
    (_bad(functions=(), methods=("tanh",)), "already the transfer 'tanh'"),
    (_bad(functions=(), modules=(nn.SELU,)), "already the transfer 'selu'"),
    (_bad(functions=()), "at least one of modules=, functions=, methods="),
    (_bad(options="beta"), "tuple of names"),
    (_bad(options=("beta", "beta")), "distinct identifiers"),
    (_bad(options=("beta",)), r"f must accept f\(z, beta=...\)"),
    (_bad(f=lambda z: z.sum()), "element-wise"),
    (_bad(F=lambda z: z[0]), "element-wise"),
    (_bad(f=lambda z: z if bool(z.sum() > 0) else -z), "make_fx"),
])
def test_bad_registrations_raise_config_error_saying_what_is_wrong(kwargs, message):
    name, f, F_ = kwargs.pop("name"), kwargs.pop("f"), kwargs.pop("F")
    with pytest.raises(ConfigError, match=message):
        lwcompile.register_transfer(name, f, F_, **kwargs)
    assert "mine" not in TRANSFERS and transfer_for("function", swish2) is None


def test_a_name_is_registered_once_unless_replaced():
    lwcompile.register_transfer("swish2", swish2, swish2_F, modules=(Swish2,))
    with pytest.raises(ConfigError, match="already registered; pass replace=True"):
        lwcompile.register_transfer("swish2", swish2, swish2_F, functions=(swish2,))
    lwcompile.register_transfer("swish2", swish2, swish2_F, functions=(swish2,), replace=True)
    assert transfer_for("module", Swish2) is None and transfer_for("function", swish2).name == "swish2"
    with pytest.raises(ConfigError, match="already the transfer 'swish2'"):
        lwcompile.register_transfer("other", swish2, swish2_F, functions=(swish2,))


def test_training_artifacts_refuse_a_registered_transfer_naming_it(tmp_path):
    lwcompile.register_transfer("swish2", swish2, swish2_F, functions=(swish2,))
    for loss in ("matching", "squared_post", "dual_bregman"):
        with pytest.raises(ExportError, match="transfer 'swish2' not supported"):
            export_training_artifacts("linear", torch.randn(3, 2), None, torch.randn(4, 2), torch.randn(4, 3),
                                      "swish2", loss, out_dir=str(tmp_path / "a"))


# ------------------------------------------------------------------------------------------------ the row table
def test_every_spelling_of_every_builtin_row_finds_that_row():
    assert BUILTIN_TRANSFERS == {r.name for r in BUILTIN_ROWS} <= set(TRANSFERS)
    for row in BUILTIN_ROWS:
        assert TRANSFERS[row.name] is row
        for kind, key in row.spellings():
            assert transfer_for(kind, key) is row, (row.name, kind, key)
    assert transfer_for("function", F.hardtanh).options == ("min_val", "max_val")
    assert transfer_for("module", nn.ReLU6).name == "relu6"  # exact type: nn.ReLU6 subclasses nn.Hardtanh


# the transfers whose f or F has no exact ONNX form (a dilogarithm, a quadrature, erf, atan, a row-wise softmax)
NO_ONNX_F = {"gelu", "silu", "arctan", "softmax"}
NO_ONNX_POTENTIAL = NO_ONNX_F | {"softplus", "mish", "logsigmoid"}


@pytest.mark.parametrize("name", sorted(BUILTIN_TRANSFERS))
def test_training_artifacts_cover_a_transfer_exactly_where_its_row_has_onnx_builders(name):
    has_f, has_F = name not in NO_ONNX_F, name not in NO_ONNX_POTENTIAL
    assert artifact_supported("squared_pre", name)
    assert artifact_supported("squared_post", name) == has_f
    assert artifact_supported("matching", name) == has_F
    assert artifact_supported("dual_bregman", name) == (has_f and has_F)


def test_one_added_row_is_recognised_trained_and_exported(tmp_path):
    """A transfer function is one TransferRow: f, f′, F, its spellings and its ONNX f; nothing else is edited."""
    from lwcompile.passes.local_losses import value
    from lwcompile.runtime.ort import OrtTrainingBlock
    s = lambda t: torch.sigmoid(2 * t)  # noqa: E731
    row = TransferRow("swish2", f=lambda z, kw: swish2(z), F=lambda z, kw: swish2_F(z),
                      fprime=lambda z, kw: s(z) + 2 * z * s(z) * (1 - s(z)), functions=(swish2,),
                      onnx_f=lambda g, t, kw: g("Mul", t, g("Sigmoid", g.scale(t, 2.0))))
    add_transfer_row(row)
    try:
        x, y = _data(6)
        _assert_one_step_is_sgd(WrappedNet(), x, y, "gd_post", transfer="swish2")
        assert artifact_supported("squared_post", "swish2") and not artifact_supported("matching", "swish2")
        w, b, xs, t = torch.randn(5, 4) * 0.8, torch.randn(5), torch.randn(12, 4) * 2.5, torch.randn(12, 5)
        export_training_artifacts("linear", w, b, xs, t, "swish2", "squared_post", out_dir=str(tmp_path / "a"))
        got = OrtTrainingBlock(str(tmp_path / "a")).train(xs, t, steps=3, lr=0.01)
        W, B = w.double().requires_grad_(), b.double().requires_grad_()
        for _ in range(3):
            gW, gB = torch.autograd.grad(value("squared_post", "swish2", {}, xs.double() @ W.T + B, t.double()), [W, B])
            W, B = (W - 0.01 * gW).detach().requires_grad_(), (B - 0.01 * gB).detach().requires_grad_()
        for name, ref in (("weight", W), ("bias", B)):
            r = ref.detach().numpy()
            assert np.abs(got[name] - r).max() <= 1e-4 * np.abs(r).max(), name
        with pytest.raises(ConfigError, match="already registered"):
            add_transfer_row(row)
    finally:
        remove_transfer_row("swish2")
    assert transfer_for("function", swish2) is None
