"""Generated architectures for the property-based SGD-identity test (test fixtures, not API).

A :class:`Spec` is a small, printable (and ``eval``-able) description of a model; :func:`build` turns it into
``(model, inputs, labels, loss_fn)`` in float64, deterministically from ``spec.seed``. The hypothesis
strategies that draw specs are in test_fuzz_identity.py. Reproduce a failing spec with
``build(eval("Spec(...)", vars(fuzz_models)))``.
"""
from __future__ import annotations

import copy
import math
from dataclasses import MISSING, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

import fuzz_extras as X
from fuzz_extras import Conv1D


class _Compact:
    """repr without the fields left at their defaults (still ``eval``-able); hypothesis prints it too."""

    def __repr__(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                 if f.default is MISSING or getattr(self, f.name) != f.default]
        return f"{type(self).__name__}({', '.join(parts)})"

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(repr(self))


@dataclass(frozen=True, repr=False)
class Act(_Compact):
    name: str = "none"  # a key of FORMS
    form: str = "nn"  # one of FORMS[name]
    kw: tuple = ()  # (option, value) pairs in the function's positional order


@dataclass(frozen=True, repr=False)
class Dense(_Compact):
    """z = linear(h); ``pre`` glue ops on z; y = act(z); ``post`` glue ops on y. ``tie``: index of an earlier
    layer whose weight this one shares (attribute assignment). ``freeze``: "w", "b", "wb" -> requires_grad False.
    ``hooks``: (site, "KIND:FN") pairs, site "lin" (the linear module), "act" (the activation module) or "unit" (the
    layer); ``param``: a parametrization of the linear module (fuzz_extras.PARAMS); ``detach``: "w" (the weight is
    used as ``w.detach()``), "in" (the layer's input is detached)."""
    d_out: int
    form: str = "nn.Linear"  # one of LINEAR_FORMS
    bias: bool = True
    act: Act = Act()
    pre: tuple = ()
    post: tuple = ()
    freeze: str = ""
    tie: int | None = None
    hooks: tuple = ()
    param: str = ""
    detach: str = ""


@dataclass(frozen=True, repr=False)
class Cat(_Compact):
    """torch.cat of two Dense branches of the same input, on the last axis."""
    a: Dense
    b: Dense


@dataclass(frozen=True, repr=False)
class Conv(_Compact):
    c_out: int
    k: int = 3
    stride: int = 1
    padding: int | str = 0
    dilation: int = 1
    groups: int = 1
    padding_mode: str = "zeros"
    transpose: bool = False
    output_padding: int = 0
    form: str = "nn"  # "nn", "F" (positional), "F(kw)" (input=, weight=, ...)
    bias: bool = True
    act: Act = Act()
    pre: tuple = ()
    post: tuple = ()
    freeze: str = ""
    hooks: tuple = ()
    param: str = ""


@dataclass(frozen=True, repr=False)
class Side(_Compact):
    """h -> h + g (how "add") or h * sigmoid(g) (how "gate"), g = branch(h) (times a parameter vector of the layer's
    own when ``scale``), computed as ``mode`` says (fuzz_extras.SIDE_MODES: under torch.no_grad(), under
    torch.set_grad_enabled(False), detached at its output or input, or plain). ``branch.d_out`` is h's width."""
    branch: Dense
    mode: str = "nograd"
    how: str = "add"
    scale: bool = False


@dataclass(frozen=True, repr=False)
class Flatten(_Compact):
    d: int  # features per example after it
    form: str = ".flatten(1)"  # ".flatten(1)", "torch.flatten", "nn.Flatten", ".reshape", "gap" (global mean)


@dataclass(frozen=True, repr=False)
class Embed(_Compact):
    vocab: int
    d: int
    form: str = "nn"  # "nn" (nn.Embedding) or "F" (F.embedding of a bare parameter)


@dataclass(frozen=True, repr=False)
class Spec(_Compact):
    family: str  # "mlp", "conv1d", "conv2d", "lm"
    in_shape: tuple  # one example's shape (lm: (L,) tokens)
    layers: tuple
    batch: int = 4
    loss: str = "mse"  # "mse" or "ce"
    target: str = "md_post"
    frontend: str = "auto"
    seed: int = 0
    hooks: tuple = ()  # "KIND:FN" hooks on the root module


# ---------------------------------------------------------------- transfer functions, in every spelling
# Forms: "nn" / "nn(inplace)" (module, options positional), "F.f" / "torch.f" / "F.f_" / "torch.f_" (options
# positional), "F.f(kw)" (options as keywords), "F.f(inplace)", ".f" / ".f_" (tensor methods).
FORMS = {
    "relu": ["nn", "nn(inplace)", "F.relu", "torch.relu", ".relu", "F.relu(inplace)", "torch.relu_", "F.relu_",
             ".relu_"],
    "leaky_relu": ["nn", "nn(inplace)", "F.leaky_relu", "F.leaky_relu(kw)", "F.leaky_relu(inplace)", "F.leaky_relu_"],
    "tanh": ["nn", "torch.tanh", "F.tanh", ".tanh", ".tanh_"],
    "sigmoid": ["nn", "torch.sigmoid", "F.sigmoid", ".sigmoid", ".sigmoid_"],
    "softplus": ["nn", "F.softplus", "F.softplus(kw)"],
    "elu": ["nn", "nn(inplace)", "F.elu", "F.elu(inplace)", "F.elu_"],
    "gelu": ["nn", "F.gelu(kw)"],
    "silu": ["nn", "nn(inplace)", "F.silu", "F.silu(inplace)"],
    "atan": ["torch.atan", "torch.arctan", ".atan", ".atan_", ".arctan"],
    "softmax": ["nn", "F.softmax", "F.softmax(kw)", "torch.softmax", ".softmax"],
    "hardswish": ["nn", "nn(inplace)", "F.hardswish", "F.hardswish(inplace)"],
    "hardsigmoid": ["nn", "nn(inplace)", "F.hardsigmoid", "F.hardsigmoid(inplace)"],
    "relu6": ["nn", "nn(inplace)", "F.relu6", "F.relu6(inplace)"],
    "hardtanh": ["nn", "nn(inplace)", "F.hardtanh", "F.hardtanh(inplace)", "F.hardtanh_"],
    "mish": ["nn", "nn(inplace)", "F.mish", "F.mish(inplace)"],
    "selu": ["nn", "nn(inplace)", "F.selu", "F.selu(inplace)", "torch.selu_"],
    "celu": ["nn", "nn(inplace)", "F.celu", "F.celu(inplace)"],
    "logsigmoid": ["nn", "F.logsigmoid"],
    "softsign": ["nn", "F.softsign"],
}
ACTS = list(FORMS)
_MODULE = {"relu": "ReLU", "leaky_relu": "LeakyReLU", "tanh": "Tanh", "sigmoid": "Sigmoid", "softplus": "Softplus",
           "elu": "ELU", "gelu": "GELU", "silu": "SiLU", "softmax": "Softmax", "hardswish": "Hardswish",
           "hardsigmoid": "Hardsigmoid", "relu6": "ReLU6", "hardtanh": "Hardtanh", "mish": "Mish", "selu": "SELU",
           "celu": "CELU", "logsigmoid": "LogSigmoid", "softsign": "Softsign"}
OPTIONS = {  # option -> values, in the function's positional order
    "leaky_relu": {"negative_slope": [0.01, 0.2]}, "softplus": {"beta": [1.0, 2.0], "threshold": [20.0, 1.0]},
    "elu": {"alpha": [1.0, 0.5]}, "gelu": {"approximate": ["none", "tanh"]}, "softmax": {"dim": [-1]},
    "hardtanh": {"min_val": [-1.0, -0.5], "max_val": [1.0, 0.7]},
    # not 0.7: torch's own in-place CELU backward uses 1/alpha in float32 (a 1e-7 error in the *reference*)
    "celu": {"alpha": [1.0, 0.5]},
}


def act_module(act: Act) -> nn.Module | None:
    if act.name == "none" or not act.form.startswith("nn"):
        return None
    inplace = {"inplace": True} if "inplace" in act.form else {}
    return getattr(nn, _MODULE[act.name])(*dict(act.kw).values(), **inplace)


def apply_act(act: Act, h: torch.Tensor, module: nn.Module | None) -> torch.Tensor:
    if act.name == "none":
        return h
    if module is not None:
        return module(h)
    kw = dict(act.kw)
    ns, _, rest = act.form.partition(".")
    fn = rest.split("(")[0]
    if ns == "":
        return getattr(h, fn)(*kw.values())
    if act.form.endswith("(kw)"):
        return getattr(F, fn)(h, **kw)
    if act.form.endswith("(inplace)"):
        return getattr(F, fn)(h, *kw.values(), inplace=True)
    return getattr(F if ns == "F" else torch, fn)(h, *kw.values())


# ---------------------------------------------------------------- layers
LINEAR_FORMS = ["nn.Linear", "F.linear", "F.linear(kw)", "x@W.T", "x@W", "matmul(x,W.t())"]
# torch.addmm(b, x, W) with W (in, out) (α=β=1, or α/β given), b.addmm(x, W), HF's Conv1D module, and a grouped
# linear through torch.baddbmm(b, x, W) with W (2, in/2, out/2) (even widths only). Without a bias parameter, addmm
# and Conv1D add a bias buffer and baddbmm becomes torch.bmm (no block: the weight goes to the outer optimizer).
ADDMM_FORMS = ["addmm", "addmm(ab)", ".addmm", "Conv1D", "baddbmm"]


def param_shape(form: str, d_in: int, d_out: int) -> tuple:
    if form == "baddbmm":
        return (2, d_in // 2, d_out // 2)
    return (d_in, d_out) if form in ("x@W", "addmm", "addmm(ab)", ".addmm", "Conv1D") else (d_out, d_in)


def _glue(op: str, c: int, nd: int) -> nn.Module | None:
    """Modules of the glue ops (nd: 0 for features-last tensors, 1/2 for conv feature maps)."""
    if op == "ln":
        return nn.LayerNorm(c)
    if op in ("bn", "bn_eval"):
        bn = (nn.BatchNorm1d if nd < 2 else nn.BatchNorm2d)(c)
        if op == "bn_eval":
            bn.eval()
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
        return bn
    if op.startswith("dropout"):  # in eval mode, or p=0: the reference could not replay the mask otherwise
        return nn.Dropout(0.4).eval() if op == "dropout_eval" else nn.Dropout(0.0)
    if op in ("maxpool", "avgpool"):
        return getattr(nn, f"{op[:3].capitalize()}Pool{nd}d")(2)
    return None


class _Unit(nn.Module):
    """A linear op, glue on its output, a transfer function, glue on that (Dense and Conv layers)."""

    def _setup(self, s, c: int, nd: int) -> None:
        self.s, self.nd = s, nd
        self.glue = nn.ModuleDict({f"{w}_{op}": m for w, ops in (("pre", s.pre), ("post", s.post)) for op in ops
                                   if (m := _glue(op, c, nd)) is not None})
        self.act = act_module(s.act)

    def _extras(self) -> None:
        """The layer's parametrization and hooks (after its modules exist)."""
        s, mod = self.s, getattr(self, "lin", None) or getattr(self, "conv", None)
        if s.param:
            X.parametrize(mod, s.param)
        sites = {"lin": mod, "act": self.act, "unit": self}
        for site, hook in s.hooks:
            X.register_hooks(sites[site], (hook,))

    def holder(self) -> tuple[nn.Module, str, str]:
        """(module, weight attribute, bias attribute) of the layer's parameters."""
        mod = getattr(self, "lin", None) or getattr(self, "conv", None)
        return (mod, "weight", "bias") if mod is not None else (self, "w", "b")

    def _glue_ops(self, where: str, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        for op in getattr(self.s, where):
            if f"{where}_{op}" in self.glue:
                h = self.glue[f"{where}_{op}"](h)
            elif op == "mul_":
                h.mul_(2.0)
            elif op == "iadd":
                h += skip
            elif op == "add":
                h = h + skip
            else:  # F.maxpool, F.avgpool
                h = getattr(F, f"{op[2:5]}_pool{self.nd}d")(h, 2)
        return h

    def forward(self, h):
        if getattr(self.s, "detach", "") == "in":
            h = h.detach()
        z = self._glue_ops("pre", self.linear(h), h)
        return self._glue_ops("post", apply_act(self.s.act, z, self.act), h)


class DenseLayer(_Unit):
    def __init__(self, s: Dense, d_in: int) -> None:
        super().__init__()
        if s.form == "nn.Linear":
            self.lin = nn.Linear(d_in, s.d_out, bias=s.bias)
        elif s.form == "Conv1D":
            self.lin = Conv1D(s.d_out, d_in, bias=s.bias)
        else:
            self.w = nn.Parameter(torch.randn(param_shape(s.form, d_in, s.d_out)) / math.sqrt(d_in))
            b_shape = (2, 1, s.d_out // 2) if s.form == "baddbmm" else (s.d_out,)
            self.b = nn.Parameter(torch.randn(b_shape) * 0.2) if s.bias else None
            if not s.bias and "addmm" in s.form and s.form != "baddbmm":  # addmm needs a bias: a buffer
                self.register_buffer("b_buf", torch.randn(s.d_out) * 0.2)
        self.d_in = d_in
        self._setup(s, s.d_out, 0)
        self._extras()

    def linear(self, h):
        s = self.s
        if s.form in ("nn.Linear", "Conv1D"):
            return self.lin(h)
        w = self.w.detach() if s.detach == "w" else self.w
        if s.form == "F.linear":
            return F.linear(h, w, self.b) if s.bias else F.linear(h, w)
        if s.form == "F.linear(kw)":
            return F.linear(input=h, weight=w, bias=self.b) if s.bias else F.linear(input=h, weight=w)
        if s.form in ADDMM_FORMS:
            b = self.b if s.bias else getattr(self, "b_buf", None)  # baddbmm without a bias: torch.bmm
            return X.addmm_forward(s.form, h, w, b, self.d_in, s.d_out)
        z = h @ w if s.form == "x@W" else (h @ w.T if s.form == "x@W.T" else torch.matmul(h, w.t()))
        return z + self.b if s.bias else z


class ConvLayer(_Unit):
    def __init__(self, s: Conv, c_in: int, nd: int) -> None:
        super().__init__()
        if s.form == "nn":
            cls = getattr(nn, f"Conv{'Transpose' if s.transpose else ''}{nd}d")
            extra = {"output_padding": s.output_padding} if s.transpose else {"padding_mode": s.padding_mode}
            self.conv = cls(c_in, s.c_out, s.k, s.stride, s.padding, dilation=s.dilation, groups=s.groups,
                            bias=s.bias, **extra)
        else:
            shape = (c_in, s.c_out // s.groups) if s.transpose else (s.c_out, c_in // s.groups)
            self.w = nn.Parameter(torch.randn(*shape, *[s.k] * nd) / math.sqrt(shape[1] * s.k ** nd))
            self.b = nn.Parameter(torch.randn(s.c_out) * 0.2) if s.bias else None
        self._setup(s, s.c_out, nd)
        self._extras()

    def linear(self, h):
        s = self.s
        if s.form == "nn":
            return self.conv(h)
        fn = getattr(F, f"conv{'_transpose' if s.transpose else ''}{self.nd}d")
        if s.transpose and s.form == "F":
            return fn(h, self.w, self.b, s.stride, s.padding, s.output_padding, s.groups, s.dilation)
        if s.transpose:
            return fn(input=h, weight=self.w, bias=self.b, stride=s.stride, padding=s.padding,
                      output_padding=s.output_padding, groups=s.groups, dilation=s.dilation)
        if s.form == "F":
            return fn(h, self.w, self.b, s.stride, s.padding, s.dilation, s.groups)
        return fn(input=h, weight=self.w, bias=self.b, stride=s.stride, padding=s.padding, dilation=s.dilation,
                  groups=s.groups)


class CatLayer(nn.Module):
    def __init__(self, s: Cat, d_in: int) -> None:
        super().__init__()
        self.a, self.b = DenseLayer(s.a, d_in), DenseLayer(s.b, d_in)

    def forward(self, h):
        return torch.cat([self.a(h), self.b(h)], dim=-1)


class SideLayer(nn.Module):
    def __init__(self, s: Side, d_in: int) -> None:
        super().__init__()
        self.s, self.branch = s, DenseLayer(s.branch, d_in)
        self.scale = nn.Parameter(1 + 0.3 * torch.randn(s.branch.d_out)) if s.scale else None

    def forward(self, h):
        return X.side_forward(self.s.mode, self.s.how, self.branch, self.scale, h)


class FlattenLayer(nn.Module):
    def __init__(self, s: Flatten, nd: int) -> None:
        super().__init__()
        self.form, self.nd = s.form, nd
        self.flat = nn.Flatten() if s.form == "nn.Flatten" else None

    def forward(self, h):
        if self.flat is not None:
            return self.flat(h)
        if self.form == "torch.flatten":
            return torch.flatten(h, 1)
        if self.form == ".reshape":
            return h.reshape(h.shape[0], -1)
        return h.mean(dim=(2, 3)[:self.nd]) if self.form == "gap" else h.flatten(1)


class EmbedLayer(nn.Module):
    def __init__(self, s: Embed) -> None:
        super().__init__()
        if s.form == "nn":
            self.emb = nn.Embedding(s.vocab, s.d)
        else:
            self.w = nn.Parameter(torch.randn(s.vocab, s.d) * 0.5)

    def holder(self) -> tuple[nn.Module, str, None]:
        return (self.emb, "weight", None) if hasattr(self, "emb") else (self, "w", None)

    def forward(self, tokens):
        return self.emb(tokens) if hasattr(self, "emb") else F.embedding(tokens, self.w)


class FuzzNet(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        nd = {"conv1d": 1, "conv2d": 2}.get(spec.family, 0)
        layers, d = [], spec.in_shape[0] if nd else spec.in_shape[-1]
        for s in spec.layers:
            if isinstance(s, Embed):
                layer, d_next = EmbedLayer(s), s.d
            elif isinstance(s, Dense):
                layer, d_next = DenseLayer(s, d), s.d_out
            elif isinstance(s, Cat):
                layer, d_next = CatLayer(s, d), s.a.d_out + s.b.d_out
            elif isinstance(s, Side):
                layer, d_next = SideLayer(s, d), d
            elif isinstance(s, Conv):
                layer, d_next = ConvLayer(s, d, nd), s.c_out
            else:
                layer, d_next = FlattenLayer(s, nd), s.d
            layers.append(layer)
            d = d_next
        self.layers = nn.ModuleList(layers)
        X.register_hooks(self, spec.hooks)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def seq_cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def build(spec: Spec) -> tuple[nn.Module, tuple, torch.Tensor, callable]:
    """The model (float64), its inputs, labels and loss function, all from ``spec.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = FuzzNet(spec).double()
        units = [u for s, layer in zip(spec.layers, model.layers)
                 for u in (((s.a, layer.a), (s.b, layer.b)) if isinstance(s, Cat) else
                           ((s.branch, layer.branch),) if isinstance(s, Side) else ((s, layer),))]
        for s, layer in units:
            if getattr(s, "param", ""):
                X.after_double(layer.holder()[0], s.param)
        for s, layer in units:  # tie by attribute assignment (after .double(), which would keep ties anyway)
            if isinstance(s, Dense) and s.tie is not None:
                (mod, attr, _), (src, src_attr, _) = layer.holder(), model.layers[s.tie].holder()
                setattr(mod, attr, getattr(src, src_attr))
        for s, layer in units:  # after tying: a frozen tied weight is frozen in every use
            mod, w, b = layer.holder() if hasattr(layer, "holder") else (None, None, None)
            for flag, attr in (("w", w), ("b", b)):
                if getattr(s, "param", "") and attr == X.parametrized_attr(s.param):
                    assert flag not in s.freeze, f"{s!r}: a parametrized {attr} cannot be frozen"
                    continue
                if flag in getattr(s, "freeze", "") and isinstance(getattr(mod, attr), nn.Parameter):
                    getattr(mod, attr).requires_grad_(False)
        if spec.family == "lm":
            x = torch.randint(0, spec.layers[0].vocab, (spec.batch, *spec.in_shape))
        else:
            x = torch.randn(spec.batch, *spec.in_shape, dtype=torch.float64)
        with torch.no_grad():
            out_shape = copy.deepcopy(model)(x).shape
        if spec.loss == "ce":
            y = torch.randint(0, out_shape[-1], out_shape[:-1])
            return model, (x,), y, (F.cross_entropy if len(out_shape) == 2 else seq_cross_entropy)
        return model, (x,), torch.randn(out_shape, dtype=torch.float64), F.mse_loss

