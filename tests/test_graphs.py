"""The emitted graphs: printable, runnable on their own, and equal to an independent eager computation.

The oracle below is METHOD.md written out in plain PyTorch: each ZOO model's forward op by op, the targets
from autograd's ∂L/∂â and ∂L/∂ŷ, and the inner loop as T plain gradient-descent steps that autograd takes on
the local loss's *value* (never the library's closed-form residuals).
"""
import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcompile
from lwcompile.config import LOCAL_LOSSES, PAIRS
from lwcompile.passes.linear_ops import LINEAR_OPS
from lwcompile.passes.local_losses import LOSS_RULES
from lwcompile.passes.transfer import TRANSFERS
from zoo import ZOO

GAMMA = 0.7
TOL = dict(rtol=1e-10, atol=1e-12)  # float64 throughout

# ------------------------------------------------------------------------------------------------ the oracle
# f and F (F′ = f) of METHOD.md's tables, element-wise.
TRANSFER = {"identity": lambda z: z, "tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "elu": F.elu}
F_INTEGRAL = {
    "identity": lambda z: 0.5 * z ** 2,
    "tanh": lambda z: torch.log(torch.cosh(z)),
    "relu": lambda z: 0.5 * z * z.clamp(min=0),
    "sigmoid": lambda z: z + torch.log1p(torch.exp(-z)),
    "elu": lambda z: torch.where(z > 0, 0.5 * z ** 2, torch.exp(z) - 1 - z),  # ELU(β=1)
}


def local_value(loss: str, transfer: str, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """local(z, t) of METHOD.md summed over the batch, up to terms constant in z."""
    f, big_f = TRANSFER[transfer], F_INTEGRAL[transfer]
    if loss == "squared_pre":
        return 0.5 * ((z - t) ** 2).sum()
    if loss == "squared_post":
        return 0.5 * ((f(z) - t) ** 2).sum()
    if loss == "matching":  # F(z) − F(a) − f(a)ᵀ(z − a) with f(a) = t, less its constant terms
        return big_f(z).sum() - (t * z).sum()
    if loss == "dual_bregman":  # whose z-gradient is f′(z) ⊙ (z − a)
        return ((z - t) * f(z)).sum() - big_f(z).sum()
    raise AssertionError(loss)


def gd_by_autograd(op, transfer, loss, params, x, t, lr, steps, prox, decay):
    """T plain GD steps on ℓ(W̃) = Σ local(op(x; W̃), t) + (λ/2)‖W̃ − W‖², gradients by autograd."""
    anchor = [p.detach() for p in params]
    w = [p.detach().clone().requires_grad_() for p in params]
    for k in range(steps):
        ell = local_value(loss, transfer, op(x, *w), t)
        ell = ell + prox / 2 * sum(((p - a) ** 2).sum() for p, a in zip(w, anchor))
        grads = torch.autograd.grad(ell, w)
        step = lr * (max(1 - k / steps, 0.25) if decay else 1.0)  # the official code's decay
        w = [(p - step * g).detach().requires_grad_() for p, g in zip(w, grads)]
    return [p.detach() for p in w]


# Each ZOO model's blocks, read off its definition: the linear op as plain torch, and its transfer function.
BLOCKS = {
    "mlp": {"0": (F.linear, "tanh"), "2": (F.linear, "relu"), "4": (F.linear, "sigmoid"), "6": (F.linear, "identity")},
    "cnn": {"conv1": (partial(F.conv2d, padding=1), "identity"),  # followed by a BatchNorm
            "conv2": (partial(F.conv2d, stride=2, padding=1), "elu"), "fc": (F.linear, "identity")},
    "transformer": {"self_attn.in_proj": (F.linear, "identity"), "self_attn.out_proj": (F.linear, "identity"),
                    "linear1": (F.linear, "relu"), "linear2": (F.linear, "identity")},
}


def mlp_by_hand(m, x, buffers):
    taps, h = {}, x
    for name, (op, f) in BLOCKS["mlp"].items():
        lin = m.get_submodule(name)
        a = op(h, lin.weight, lin.bias)
        y = TRANSFER[f](a)
        taps[name], h = (h, a, y), y
    return h, taps


def cnn_by_hand(m, x, buffers):
    a1 = F.conv2d(x, m.conv1.weight, m.conv1.bias, padding=1)
    h = F.batch_norm(a1, buffers["bn1.running_mean"], buffers["bn1.running_var"], m.bn1.weight, m.bn1.bias,
                     training=True, momentum=0.1, eps=1e-5)  # updates the running statistics in place
    buffers["bn1.num_batches_tracked"] += 1
    h = F.max_pool2d(F.relu(h), 2)
    a2 = F.conv2d(h, m.conv2.weight, None, stride=2, padding=1)
    y2 = F.elu(a2)
    flat = torch.flatten(y2, 1)  # the dropout is in eval mode
    a3 = F.linear(flat, m.fc.weight, m.fc.bias)
    return a3, {"conv1": (x, a1, a1), "conv2": (h, a2, y2), "fc": (flat, a3, a3)}


BY_HAND = {"mlp": mlp_by_hand, "cnn": cnn_by_hand}
NONBLOCK = {"mlp": [], "cnn": ["bn1.weight", "bn1.bias"]}  # trained by the outer optimizer on ∂L/∂θ


def eager_step_values(arch, model, inputs, y, loss_fn, target):
    """What the target graph must return, and the buffers it must leave, computed eagerly with autograd."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    out, taps = BY_HAND[arch](model, *inputs, buffers)
    with torch.no_grad():
        torch.testing.assert_close(out, copy.deepcopy(model)(*inputs), **TOL)  # the hand-written model is the model
    loss = loss_fn(out, y)
    nonblock = [model.get_parameter(n) for n in NONBLOCK[arch]]
    grads = torch.autograd.grad(loss, [t for _, a, yh in taps.values() for t in (a, yh)] + nonblock)
    targets = {}
    for i, (name, (_, a, yh)) in enumerate(taps.items()):
        g_pre, g_post = grads[2 * i], grads[2 * i + 1]  # ∂L/∂â and ∂L/∂ŷ
        targets[name] = {"gd_pre": a - GAMMA * g_pre, "dual_md_pre": a - GAMMA * g_post,
                         "gd_post": yh - GAMMA * g_post, "md_post": yh - GAMMA * g_pre}[target].detach()
    return {"loss": loss.detach(), "inputs": {n: t[0].detach() for n, t in taps.items()}, "targets": targets,
            "grads": dict(zip(NONBLOCK[arch], grads[2 * len(taps):])), "buffers": buffers}


def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _double(arch):
    model, inputs, y, loss_fn = ZOO[arch]()
    return (model.double(), tuple(i.double() for i in inputs), y.double() if y.is_floating_point() else y,
            loss_fn)


# ------------------------------------------------------------------------------------------------ the tests
@pytest.mark.parametrize("target", list(PAIRS))
@pytest.mark.parametrize("arch", list(BY_HAND))
def test_target_graph_standalone_equals_eager_autograd(arch, target):
    """The printed target graph, called on its own, returns METHOD.md's step-1..3 values; so does compute_targets."""
    model, inputs, y, loss_fn = _double(arch)
    prog = lwcompile.transform(model, loss_fn, inputs, target=target, local_loss=PAIRS[target], gamma=GAMMA)
    assert [(b.name, b.transfer) for b in prog.blocks] == [(n, f) for n, (_, f) in BLOCKS[arch].items()]
    expect = eager_step_values(arch, model, inputs, y, loss_fn, target)

    tg = prog.build_target_graph(y)
    assert "def forward" in tg.code
    sig = prog.target_signature
    params, buffers = dict(model.named_parameters()), {n: b.clone() for n, b in model.named_buffers()}
    with torch.no_grad():
        outs = tg(*[params[n] for n in sig.params], *[buffers[n] for n in sig.buffers], *inputs, y)
    m = len(sig.blocks)
    graph = {"loss": outs[0], "inputs": dict(zip(sig.blocks, outs[1:1 + m])),
             "targets": dict(zip(sig.blocks, outs[1 + m:1 + 2 * m])), "grads": dict(zip(sig.nonblock, outs[1 + 2 * m:]))}
    via_step = prog.compute_targets(inputs, y)
    for got, buf in ((graph, buffers), (via_step, dict(model.named_buffers()))):
        torch.testing.assert_close(got["loss"], expect["loss"], **TOL)
        for key in ("inputs", "targets", "grads"):
            assert set(got[key]) == set(expect[key]), key
            for name, v in expect[key].items():
                torch.testing.assert_close(got[key][name], v, **TOL, msg=f"{key}[{name}]")
        for name, v in expect["buffers"].items():  # BatchNorm's running statistics, moved once
            torch.testing.assert_close(buf[name], v, **TOL, msg=name)


@pytest.mark.parametrize("loss", LOCAL_LOSSES)
@pytest.mark.parametrize("arch", list(BLOCKS))
def test_inner_graph_equals_T_gd_steps_by_autograd_on_the_local_loss(arch, loss):
    """Each printed inner graph, called on its own, equals T=5 GD steps (decayed step, proximal term) that
    autograd takes on local_value above."""
    model, inputs, _, loss_fn = _double(arch)
    target = {v: k for k, v in PAIRS.items()}[loss]
    cfg = lwcompile.Config(target=target, local_loss=loss, steps=5, inner_optimizer="gd", inner_lr=0.02, prox=0.3,
                           inner_lr_decay=True)
    prog = lwcompile.transform(model, loss_fn, inputs, cfg)
    assert [(b.name, b.transfer) for b in prog.blocks] == [(n, f) for n, (_, f) in BLOCKS[arch].items()]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)

    def rand(shape, scale=1.0):
        return scale * torch.randn(shape, generator=g, dtype=torch.float64)

    for block in prog.blocks:
        op, transfer = BLOCKS[arch][block.name]
        gm = prog.inner_graph(block.name, preact=False, offset=False)  # the target form: takes t itself
        assert "def forward" in gm.code
        params = [rand(shapes[p], 0.3) for p in block.params]
        x, t = rand(block.input_shape), rand(block.output_shape, 0.5)
        lr = torch.tensor(0.02, dtype=torch.float64)
        state = prog.inner_state[block.name]
        got = gm(*params, x, t, lr, *state)
        # the variants a step runs take the target's offset d = s(â) − t (s = f for post-activation losses) and
        # the forward pass's pre-activation â = op(x; W, b) (both computed eagerly here)
        a_hat = LINEAR_OPS[block.op].apply(x, params[0], params[1] if block.bias else None, dict(block.attrs))
        base = TRANSFERS[transfer].f(a_hat, dict(block.transfer_kwargs)) if LOSS_RULES[loss].space == "post" else a_hat
        d = base - t
        got_offset = prog.inner_graph(block.name, preact=False)(*params, x, d, lr, *state)
        got_reusing = prog.inner_graph(block.name, preact=True)(*params, x, d, lr, a_hat, *state)
        expect = gd_by_autograd(op, transfer, loss, params, x, t, 0.02, steps=5, prox=0.3, decay=True)
        assert len(got) == len(expect) == len(got_reusing) == len(got_offset)  # plain GD keeps no state
        for name, p0, a, o, r, e in zip(block.params, params, got, got_offset, got_reusing, expect):
            assert (e - p0).abs().max() > 1e-3, f"{block.name}: {name} hardly moves; the check would be weak"
            torch.testing.assert_close(a, e, **TOL, msg=f"{block.name}: {name}")
            torch.testing.assert_close(o, e, **TOL, msg=f"{block.name}: {name} (offset form)")
            torch.testing.assert_close(r, e, **TOL, msg=f"{block.name}: {name} (offset form, reusing â)")


def test_inner_loop_state_persists_across_steps():
    m = _mlp()
    prog = lwcompile.transform(m, F.mse_loss, torch.randn(6, 4, dtype=torch.float64), inner_optimizer="adam",
                               steps=3, inner_lr=1e-3)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    prog.step(x, y)
    assert float(prog.inner_state["0"][-1]) == 3.0  # Adam's step counter after T=3
    prog.step(x, y)
    assert float(prog.inner_state["0"][-1]) == 6.0


def test_program_prints_a_block_table():
    model, inputs, y, loss_fn = ZOO["cnn"]()
    text = str(lwcompile.transform(model, loss_fn, inputs))
    for col in ("block", "op", "transfer", "weight shape", "FLOPs/example"):
        assert col in text
    assert "conv1" in text and "conv2d" in text and "4x2x3x3" in text and "elu" in text
    # conv1: 4 output channels x 8x8 positions x (2*3*3) MACs x 2
    assert f"{2 * 4 * 64 * 18:,}" in text


def test_batch_size_change_retraces_and_still_matches_sgd():
    m = _mlp()
    prog = lwcompile.transform(m, F.mse_loss, torch.randn(6, 4, dtype=torch.float64), target="gd_pre",
                               local_loss="squared_pre", steps=1, inner_optimizer="gd", inner_lr=0.1, gamma=1.0,
                               outer_optimizer="sgd", outer_lr=0.1)
    import copy
    ref = copy.deepcopy(m)
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    F.mse_loss(ref(x), y).backward()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    prog.step(x, y)
    for p, r in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)


def test_inner_lr_is_a_graph_input_so_schedules_need_no_retrace():
    m = _mlp()
    prog = lwcompile.transform(m, F.mse_loss, torch.randn(6, 4, dtype=torch.float64), inner_optimizer="gd")
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    prog.step(x, y)
    res = prog.compute_targets(x, y)
    before = {name: gm for name, (gm, _) in prog.inner_jobs(res["inputs"], res["targets"], preacts=res["preacts"],
                                                              offsets=res["offsets"]).items()}
    assert before == dict(prog.inner_graphs)  # what a step runs are the published graphs
    prog.inner_lr = 0.5
    prog.step(x, y)
    for name, (gm, args) in prog.inner_jobs(res["inputs"], res["targets"], preacts=res["preacts"],
                                            offsets=res["offsets"]).items():
        assert gm is before[name] and prog.inner_graph(name) is before[name], name  # the same graph objects
        assert float(args[prog.inner_signature(name).input_names.index("lr")]) == 0.5  # the new lr is an argument
    with pytest.raises(lwcompile.ConfigError):
        prog.inner_lr = -1.0
    before = [p.detach().clone() for p in m.parameters()]
    prog.inner_lr = 0.0  # a warm-up epoch at lr 0 moves no block weight (the model has no non-block params)
    prog.step(x, y)
    for p, b in zip(m.parameters(), before):
        assert torch.equal(p, b)


def test_profile_measures_every_block_and_feeds_the_plan():
    model, inputs, y, loss_fn = ZOO["cnn"]()
    prog = lwcompile.transform(model, loss_fn, inputs, steps=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prof = prog.profile(inputs, y, repeats=2)
    assert set(prof) == {b.name for b in prog.blocks} and all(t > 0 for t in prof.values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    plan = prog.plan(2, "replicated", profile=prof)
    assert plan.makespan == pytest.approx(max(plan.times.values()))
    assert plan.makespan >= plan.lower_bound - 1e-12
