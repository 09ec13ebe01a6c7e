"""Time to the first step (``lwcompile.transform`` + the first ``prog.step``) of two ImageNet-style replicas.

ResNet-50 (bottleneck blocks 3-4-6-3, conv/BN/ReLU, projection shortcuts) and MobileNetV3-small (inverted
residuals with depthwise convs, hardswish, squeeze-excitation), written out here because torchvision is not a
dependency. ``--no-depthwise`` replaces MobileNet's depthwise convs by dense ones (their grouped-conv weight
gradient is traced separately, in passes/linear_ops.py). ``--profile`` prints the top cProfile entries, ``--phases``
the CPU seconds of each phase. CPU seconds (one thread) are the load-independent number on a shared machine.

    .venv/bin/python benchmarks/first_step.py --models resnet50 mobilenetv3 --size 64
"""
from __future__ import annotations

import argparse
import os
import cProfile
import pstats
import time

import torch
import torch.nn.functional as F
from torch import nn

import lwcompile


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else None)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return F.relu(h + (x if self.down is None else self.down(x)))


def resnet50(classes: int = 1000) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for width, n, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(n):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


class SE(nn.Module):
    def __init__(self, c: int, squeeze: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


def _div(v: float) -> int:
    return max(8, int(v + 4) // 8 * 8)


class InvertedResidual(nn.Module):
    def __init__(self, cin, k, exp, cout, se, act, stride, depthwise=True) -> None:
        super().__init__()
        self.act = nn.Hardswish() if act == "HS" else nn.ReLU()
        self.expand = (nn.Sequential(nn.Conv2d(cin, exp, 1, bias=False), nn.BatchNorm2d(exp)) if exp != cin else None)
        self.dw = nn.Conv2d(exp, exp, k, stride, k // 2, groups=exp if depthwise else 1, bias=False)
        self.bn = nn.BatchNorm2d(exp)
        self.se = SE(exp, _div(exp // 4)) if se else None
        self.project = nn.Sequential(nn.Conv2d(exp, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.res = stride == 1 and cin == cout

    def forward(self, x):
        h = self.act(self.expand(x)) if self.expand is not None else x
        h = self.act(self.bn(self.dw(h)))
        if self.se is not None:
            h = self.se(h)
        h = self.project(h)
        return h + x if self.res else h


# (kernel, expansion, out, SE, activation, stride): torchvision's mobilenet_v3_small table
_SMALL = ((3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
          (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
          (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1), (5, 288, 96, True, "HS", 2),
          (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1))


def mobilenetv3_small(classes: int = 1000, depthwise: bool = True) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish()]
    cin = 16
    for k, exp, cout, se, act, s in _SMALL:
        layers.append(InvertedResidual(cin, k, exp, cout, se, act, s, depthwise))
        cin = cout
    layers += [nn.Conv2d(cin, 576, 1, bias=False), nn.BatchNorm2d(576), nn.Hardswish(), nn.AdaptiveAvgPool2d(1),
               nn.Flatten(), nn.Linear(576, 1024), nn.Hardswish(), nn.Linear(1024, classes)]
    return nn.Sequential(*layers)


MODELS = {"resnet50": lambda dw: resnet50(), "mobilenetv3": lambda dw: mobilenetv3_small(depthwise=dw)}


def first_step(name: str, size: int, batch: int, depthwise: bool = True) -> tuple[float, float, int, int]:
    """(wall seconds, process CPU seconds for transform + first step, blocks, inner-graph traces)."""
    torch.manual_seed(0)
    model = MODELS[name](depthwise)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    t, c = time.perf_counter(), time.process_time()
    prog = lwcompile.transform(model, F.cross_entropy, (x,))
    prog.step(x, y)
    traces = len(prog._inner_cache) + getattr(getattr(prog, "_shared_inner", None), "traces", 0)
    return time.perf_counter() - t, time.process_time() - c, len(prog.blocks), traces


PHASES = (  # (module, attribute, label): what --phases times
    ("lwcompile.program", "snapshot", "guards snapshot"), ("lwcompile.pipeline", "snapshot", "guards snapshot"),
    ("lwcompile.program", "build_target_graph", "target graph trace"),
    ("lwcompile.program", "build_inner_graph", "inner graph traces"),
    ("lwcompile.passes.inner_share", "build_inner_graph", "inner graph traces"),
    ("lwcompile.program", "run_jobs", "first execution of the inner graphs"))


def timed_phases() -> dict[str, float]:
    """Wrap the pipeline stages and the functions in :data:`PHASES` with CPU timers; returns the live totals."""
    import dataclasses
    import importlib

    from lwcompile import pipeline
    totals: dict[str, float] = {}

    def timer(f, label):
        def g(*a, **k):
            c = time.process_time()
            try:
                return f(*a, **k)
            finally:
                totals[label] = totals.get(label, 0.0) + time.process_time() - c
        return g
    pipeline.PIPELINE = tuple(dataclasses.replace(st, call=timer(st.call, f"pipeline: {st.name}"))
                              for st in pipeline.PIPELINE)
    for mod, attr, label in PHASES:
        try:
            m = importlib.import_module(mod)
        except ImportError:  # an older checkout, compared with --phases
            continue
        if hasattr(m, attr):
            setattr(m, attr, timer(getattr(m, attr), label))
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--no-depthwise", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--phases", action="store_true", help="CPU seconds per phase (tracing, partition, graphs, ...)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    totals = timed_phases() if a.phases else {}
    for name in a.models:
        totals.clear()
        pr = cProfile.Profile() if a.profile else None
        if pr:
            pr.enable()
        secs, cpu, blocks, graphs = first_step(name, a.size, a.batch, not a.no_depthwise)
        if pr:
            pr.disable()
            pstats.Stats(pr).sort_stats("cumtime").print_stats(30)
        print(f"{name:12} first step {secs:6.2f} s wall {cpu:6.2f} s CPU  blocks {blocks:3}  inner-graph traces "
              f"{graphs:3}  load average {os.getloadavg()[0]:.1f}")
        for label, v in totals.items():
            print(f"    {label:38} {v:6.2f} s CPU")
        if totals:
            print(f"    {'the rest (imports, checks, Python)':38} {cpu - sum(totals.values()):6.2f} s CPU")


if __name__ == "__main__":
    main()
