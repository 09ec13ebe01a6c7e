"""Time to the first step (``lwcompile.transform`` + the first ``prog.step``) of two ImageNet-style replicas.

ResNet-50 (bottleneck blocks 3-4-6-3, conv/BN/ReLU, projection shortcuts) and MobileNetV3-small (inverted
residuals with depthwise convs, hardswish, squeeze-excitation), written out here because torchvision is not a
dependency. ``--no-depthwise`` replaces MobileNet's depthwise convs by dense ones (their grouped-conv weight
gradient is traced separately, in passes/linear_ops.py). ``--profile`` prints the top cProfile entries.

    .venv/bin/python benchmarks/first_step.py --models resnet50 mobilenetv3 --size 64
"""
from __future__ import annotations

import argparse
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


def first_step(name: str, size: int, batch: int, depthwise: bool = True) -> tuple[float, int, int]:
    """(seconds for transform + first step, blocks, traced inner graphs)."""
    torch.manual_seed(0)
    model = MODELS[name](depthwise)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    t = time.perf_counter()
    prog = lwcompile.transform(model, F.cross_entropy, (x,))
    prog.step(x, y)
    return time.perf_counter() - t, len(prog.blocks), len(prog._inner_cache) + prog._shared_inner.traces


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--no-depthwise", action="store_true")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    for name in a.models:
        pr = cProfile.Profile() if a.profile else None
        if pr:
            pr.enable()
        secs, blocks, graphs = first_step(name, a.size, a.batch, not a.no_depthwise)
        if pr:
            pr.disable()
            pstats.Stats(pr).sort_stats("cumtime").print_stats(30)
        print(f"{name:12} first step {secs:6.2f} s  blocks {blocks:3}  traced inner graphs {graphs:3}")


if __name__ == "__main__":
    main()
