"""Small models of every architecture family the compiler must handle (test fixtures, not API)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp() -> tuple[nn.Module, tuple, torch.Tensor, callable]:
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 5), nn.Sigmoid(),
                      nn.Linear(5, 3))
    x = torch.randn(10, 6)
    return m, (x,), torch.randn(10, 3), F.mse_loss


class CNN(nn.Module):
    """Conv + BatchNorm + pooling + dropout (train-mode BatchNorm; dropout set to eval by the fixture)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(6 * 2 * 2, 5)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = torch.nn.functional.elu(self.conv2(x))
        return self.fc(self.drop(torch.flatten(x, 1)))


def cnn():
    m = CNN()
    m.drop.eval()
    return m, (torch.randn(8, 2, 8, 8),), torch.randint(0, 5, (8,)), F.cross_entropy


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + x)


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block1 = ResBlock(4)
        self.block2 = ResBlock(4)
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.block2(self.block1(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet():
    return ResNet(), (torch.randn(6, 3, 6, 6),), torch.randint(0, 4, (6,)), F.cross_entropy


def transformer():
    m = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    return m, (torch.randn(4, 5, 8),), torch.randn(4, 5, 8), F.mse_loss


class Functional(nn.Module):
    """Weights as bare parameters, used through F.linear, x @ W.T, x @ W, F.conv1d and tensor methods."""

    def __init__(self) -> None:
        super().__init__()
        self.wc = nn.Parameter(torch.randn(3, 2, 3) * 0.3)
        self.w1 = nn.Parameter(torch.randn(8, 15) * 0.3)
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.w2 = nn.Parameter(torch.randn(7, 8) * 0.3)
        self.b2 = nn.Parameter(torch.randn(7) * 0.1)
        self.w3 = nn.Parameter(torch.randn(7, 6) * 0.3)
        self.w4 = nn.Parameter(torch.randn(6, 6) * 0.3)
        self.w5 = nn.Parameter(torch.randn(4, 6) * 0.3)
        self.w6 = nn.Parameter(torch.randn(4, 4) * 0.3)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        h = F.softplus(F.conv1d(x, self.wc, padding=1)).flatten(1)  # (N, 3*5)
        h = F.gelu(F.linear(h, self.w1, self.b1))
        h = (h @ self.w2.T + self.b2).relu()  # the add sits between: identity block, b2 non-block
        h = F.leaky_relu(h @ self.w3, 0.2)
        h = torch.atan(torch.matmul(h, self.w4.t()))
        h = F.silu(F.linear(h, self.w5))
        return torch.softmax(h @ self.w6.T, dim=-1) * self.scale


def functional():
    return Functional(), (torch.randn(9, 2, 5),), torch.rand(9, 4), F.mse_loss


class ControlFlow(nn.Module):
    """Python control flow on shapes: symbolic tracing rejects it, torch.export handles it."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.d = d
        self.inp = nn.Linear(d, d)
        self.cells = nn.ModuleList(nn.Linear(d, d) for _ in range(3))
        self.out = nn.Linear(d, 2)

    def forward(self, x):  # x: (N, L, d')
        if x.shape[-1] != self.d:
            x = x[..., : self.d]
        h = torch.tanh(self.inp(x[:, 0]))
        for i in range(x.size(1)):
            h = torch.tanh(self.cells[i](h) + x[:, i])
        return self.out(h)


def control_flow():
    return ControlFlow(), (torch.randn(5, 3, 7),), torch.randn(5, 2), F.mse_loss


class Deconv(nn.Module):
    """Conv encoder, transposed-conv decoder (ConvTranspose2d with stride and output_padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.dec = nn.ConvTranspose2d(3, 1, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x):
        return torch.sigmoid(self.dec(torch.tanh(self.enc(x))))


def deconv():
    return Deconv(), (torch.randn(4, 1, 6, 6),), torch.rand(4, 1, 6, 6), F.mse_loss


class Attention(nn.Module):
    """nn.MultiheadAttention used directly, its in/out projections as blocks, plus a GELU head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.emb(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(F.gelu(a + h)).mean(1)


def attention():
    return Attention(), (torch.randn(3, 4, 3),), torch.randn(3, 2), F.mse_loss


ZOO = {"mlp": mlp, "cnn": cnn, "resnet": resnet, "transformer": transformer, "functional": functional,
       "control_flow": control_flow, "deconv": deconv, "attention": attention}
