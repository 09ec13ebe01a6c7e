"""Faithful small-width replicas of common real architectures (test fixtures, not API).

torchvision does not import beside this torch, so the blocks are re-written here with the same structure and the same
op forms as their originals (module vs functional, ``inplace=True``, ``out += identity``, ``torch.cat`` skips, ...):
- MobileNetV3-small (torchvision 0.10 ``mobilenetv3.py``: its own SqueezeExcitation with ``ReLU(inplace=True)`` and
  ``F.hardsigmoid(inplace=True)``; ``ConvBNActivation`` with ``BatchNorm2d(eps=0.001, momentum=0.01)``);
- ResNet ``BasicBlock`` / ``Bottleneck`` (torchvision ``resnet.py``);
- ViT (timm ``vision_transformer.py``: conv patch embedding, class token, positional embedding, hand-written qkv
  Linear attention through ``F.scaled_dot_product_attention``, GELU MLP; nn.MultiheadAttention is in tests/zoo.py);
- GPT (nanoGPT ``model.py``: hand-written causal attention with a ``torch.tril`` buffer, tied ``lm_head``);
- GPT-2 (Hugging Face ``modeling_gpt2.py``: ``Conv1D`` projections as ``torch.addmm(bias, x.view(-1, nx), W)``,
  ``_split_heads`` / ``_merge_heads``, a boolean causal mask through ``torch.where``, "gelu_new", tied head);
- U-Net level (milesial Pytorch-UNet ``unet_parts.py``: DoubleConv, Down, Up with ConvTranspose2d + F.pad + cat);
- LSTM / GRU heads; a MobileNetV1/V2-style depthwise-separable stack with ``ReLU6(inplace=True)``.
Every factory returns ``(model, inputs, y, loss_fn)`` like ``tests/zoo.py``.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------- MobileNetV3-small
class ConvBNActivation(nn.Sequential):
    def __init__(self, cin, cout, kernel_size=3, stride=1, groups=1, activation_layer=None):
        padding = (kernel_size - 1) // 2
        norm = nn.BatchNorm2d(cout, eps=0.001, momentum=0.01)
        layers = [nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=False), norm]
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, input_channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)

    def _scale(self, input, inplace: bool):
        scale = self.fc2(self.relu(self.fc1(F.adaptive_avg_pool2d(input, 1))))
        return F.hardsigmoid(scale, inplace=inplace)

    def forward(self, input):
        return self._scale(input, True) * input


class InvertedResidual(nn.Module):
    def __init__(self, cin, kernel, expanded, cout, use_se, use_hs, stride):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        act = nn.Hardswish if use_hs else nn.ReLU
        layers = []
        if expanded != cin:
            layers.append(ConvBNActivation(cin, expanded, kernel_size=1, activation_layer=act))
        layers.append(ConvBNActivation(expanded, expanded, kernel, stride, groups=expanded, activation_layer=act))
        if use_se:
            layers.append(SqueezeExcitation(expanded, 8))
        layers.append(ConvBNActivation(expanded, cout, kernel_size=1, activation_layer=None))
        self.block = nn.Sequential(*layers)

    def forward(self, input):
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


class MobileNetV3Small(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvBNActivation(3, 8, kernel_size=3, stride=2, activation_layer=nn.Hardswish),
            InvertedResidual(8, 3, 8, 8, use_se=True, use_hs=False, stride=2),     # SE, no expand conv
            InvertedResidual(8, 3, 16, 8, use_se=False, use_hs=True, stride=1),    # residual connection
            ConvBNActivation(8, 48, kernel_size=1, activation_layer=nn.Hardswish))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(48, 32), nn.Hardswish(inplace=True), nn.Dropout(p=0.2, inplace=True),
                                        nn.Linear(32, num_classes))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v3_eval():
    m = MobileNetV3Small().eval()
    with torch.no_grad():  # non-trivial running statistics, as in a trained network
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return m, (torch.randn(4, 3, 16, 16),), torch.randint(0, 5, (4,)), F.cross_entropy


def mobilenet_v3_train():
    """Train mode (BatchNorm on batch statistics), dropout off."""
    m = MobileNetV3Small().train()
    m.classifier[2].eval()  # dropout's random mask (p=0.2) is one the SGD oracle cannot reproduce
    return m, (torch.randn(4, 3, 16, 16),), torch.randint(0, 5, (4,)), F.cross_entropy


# ---------------------------------------------------------------- ResNet
def conv3x3(cin, cout, stride=1, groups=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):  # torchvision's statement order, one op per line folded into nested calls
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """Stem (conv 7x7, BN, ReLU, max-pool), a BasicBlock, a strided Bottleneck with downsample, avgpool, fc."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(8, 8))
        self.layer2 = nn.Sequential(Bottleneck(8, 4, 2, nn.Sequential(conv1x1(8, 16, 2), nn.BatchNorm2d(16))))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.avgpool(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(x, 1))


def resnet():
    return ResNet(), (torch.randn(4, 3, 16, 16),), torch.randint(0, 4, (4,)), F.cross_entropy


# ---------------------------------------------------------------- ViT (timm vision_transformer.py)
class Attention(nn.Module):
    """timm's Attention: one qkv Linear, heads by reshape/permute/unbind, F.scaled_dot_product_attention, proj."""

    def __init__(self, dim, num_heads=2, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class ViTBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)  # timm's Mlp: fc1, act, drop1, fc2, drop2 in sequence
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(), drop1=nn.Dropout(0.0),
                                             fc2=nn.Linear(hidden, dim), drop2=nn.Dropout(0.0)))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))  # timm's LayerScale and DropPath are nn.Identity by default
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, img_size=8, patch_size=4, in_chans=3, num_classes=3, embed_dim=8, depth=1, num_heads=2):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)  # timm: .proj
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(0.0)
        self.blocks = nn.Sequential(*[ViTBlock(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # NCHW -> NLC
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit():
    m = VisionTransformer()
    with torch.no_grad():
        m.cls_token.normal_(0, 0.1)  # timm inits it near zero (std 1e-6); a sizeable token makes its update informative
    return m, (torch.randn(3, 3, 8, 8),), torch.randint(0, 3, (3,)), F.cross_entropy


# ---------------------------------------------------------------- GPT (nanoGPT)
class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, block_size, dropout=0.0):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout, self.resid_dropout = nn.Dropout(dropout), nn.Dropout(dropout)
        self.n_head, self.n_embd = n_head, n_embd
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        y = self.attn_dropout(F.softmax(att, dim=-1)) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class GPTBlock(nn.Module):
    def __init__(self, n_embd, n_head, block_size):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(OrderedDict(  # nanoGPT's MLP: c_fc, gelu, c_proj, dropout in sequence
            c_fc=nn.Linear(n_embd, 4 * n_embd), gelu=nn.GELU(), c_proj=nn.Linear(4 * n_embd, n_embd),
            dropout=nn.Dropout(0.0)))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size=11, block_size=6, n_embd=8, n_head=2, n_layer=1):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(0.0)
        self.h = nn.ModuleList([GPTBlock(n_embd, n_head, block_size) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying

    def forward(self, idx):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gpt_loss(logits, targets):
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def gpt():
    m = GPT()
    with torch.no_grad():
        m.wte.weight.normal_(0, 0.3)
    return m, (torch.randint(0, 11, (3, 6)),), torch.randint(0, 11, (3, 6)), gpt_loss


# ---------------------------------------------------------------- GPT-2 (Hugging Face modeling_gpt2.py)
class Conv1D(nn.Module):
    """HF ``pytorch_utils.Conv1D``: a linear layer with its weight stored (in, out), applied with ``torch.addmm``."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.2)
        nn.init.normal_(self.bias, std=0.1)  # HF inits zeros; non-zero so the bias update is informative

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        x = x.view(size_out)
        return x


class NewGELUActivation(nn.Module):
    """HF ``activations.NewGELUActivation`` ("gelu_new"), the tanh approximation written out."""

    def forward(self, input):
        return 0.5 * input * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (input + 0.044715 * torch.pow(input, 3.0))))


class GPT2Attention(nn.Module):
    def __init__(self, n_embd, n_head, n_positions):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones((n_positions, n_positions), dtype=torch.bool)).view(
            1, 1, n_positions, n_positions), persistent=False)
        self.embed_dim, self.num_heads = n_embd, n_head
        self.head_dim = n_embd // n_head
        self.split_size = n_embd
        self.c_attn = Conv1D(3 * n_embd, n_embd)
        self.c_proj = Conv1D(n_embd, n_embd)
        self.attn_dropout, self.resid_dropout = nn.Dropout(0.0), nn.Dropout(0.0)

    def _split_heads(self, tensor, num_heads, attn_head_size):
        new_shape = tensor.size()[:-1] + (num_heads, attn_head_size)
        return tensor.view(new_shape).permute(0, 2, 1, 3)  # (batch, head, seq_length, head_features)

    def _merge_heads(self, tensor, num_heads, attn_head_size):
        tensor = tensor.permute(0, 2, 1, 3).contiguous()
        new_shape = tensor.size()[:-2] + (num_heads * attn_head_size,)
        return tensor.view(new_shape)

    def _attn(self, query, key, value):
        attn_weights = torch.matmul(query, key.transpose(-1, -2))
        attn_weights = attn_weights / torch.full([], value.size(-1) ** 0.5, dtype=attn_weights.dtype,
                                                 device=attn_weights.device)
        query_length, key_length = query.size(-2), key.size(-2)
        causal_mask = self.bias[:, :, key_length - query_length: key_length, :key_length]
        mask_value = torch.finfo(attn_weights.dtype).min
        mask_value = torch.full([], mask_value, dtype=attn_weights.dtype, device=attn_weights.device)
        attn_weights = torch.where(causal_mask, attn_weights.to(attn_weights.dtype), mask_value)
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)
        attn_weights = self.attn_dropout(attn_weights)
        return torch.matmul(attn_weights, value)

    def forward(self, hidden_states):
        query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)
        query = self._split_heads(query, self.num_heads, self.head_dim)
        key = self._split_heads(key, self.num_heads, self.head_dim)
        value = self._split_heads(value, self.num_heads, self.head_dim)
        attn_output = self._merge_heads(self._attn(query, key, value), self.num_heads, self.head_dim)
        return self.resid_dropout(self.c_proj(attn_output))


class GPT2MLP(nn.Module):
    def __init__(self, intermediate_size, n_embd):
        super().__init__()
        self.c_fc = Conv1D(intermediate_size, n_embd)
        self.c_proj = Conv1D(n_embd, intermediate_size)
        self.act = NewGELUActivation()
        self.dropout = nn.Dropout(0.0)

    def forward(self, hidden_states):
        hidden_states = self.act(self.c_fc(hidden_states))
        return self.dropout(self.c_proj(hidden_states))


class GPT2Block(nn.Module):
    def __init__(self, n_embd, n_head, n_positions):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5)
        self.attn = GPT2Attention(n_embd, n_head, n_positions)
        self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5)
        self.mlp = GPT2MLP(4 * n_embd, n_embd)

    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.attn(self.ln_1(hidden_states))
        hidden_states = hidden_states + residual
        residual = hidden_states
        feed_forward_hidden_states = self.mlp(self.ln_2(hidden_states))
        return residual + feed_forward_hidden_states


class GPT2LMHead(nn.Module):
    """GPT2Model (wte, wpe, drop, h, ln_f) and the tied lm head, as ``F.linear(h, wte.weight)``."""

    def __init__(self, vocab_size=11, n_positions=6, n_embd=8, n_head=2, n_layer=2):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(n_positions, n_embd)
        self.drop = nn.Dropout(0.0)
        self.h = nn.ModuleList([GPT2Block(n_embd, n_head, n_positions) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, eps=1e-5)

    def forward(self, input_ids):
        input_shape = input_ids.size()
        position_ids = torch.arange(0, input_shape[-1], dtype=torch.long, device=input_ids.device).unsqueeze(0)
        hidden_states = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        for block in self.h:
            hidden_states = block(hidden_states)
        hidden_states = self.ln_f(hidden_states)
        return F.linear(hidden_states, self.wte.weight)


def gpt2():
    m = GPT2LMHead()
    with torch.no_grad():
        m.wte.weight.normal_(0, 0.3)
    return m, (torch.randint(0, 11, (3, 6)),), torch.randint(0, 11, (3, 6)), gpt_loss


# ---------------------------------------------------------------- U-Net level
class DoubleConv(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True))

    def forward(self, x):
        return self.double_conv(x)


class Up(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x1, x2):
        x1 = self.up(x1)
        diffY = x2.size()[2] - x1.size()[2]
        diffX = x2.size()[3] - x1.size()[3]
        x1 = F.pad(x1, [diffX // 2, diffX - diffX // 2, diffY // 2, diffY - diffY // 2])
        return self.conv(torch.cat([x2, x1], dim=1))


class UNetLevel(nn.Module):
    def __init__(self, n_channels=2, n_classes=3):
        super().__init__()
        self.inc = DoubleConv(n_channels, 4)
        self.down1 = nn.Sequential(nn.MaxPool2d(2), DoubleConv(4, 8))  # Pytorch-UNet's Down
        self.up1 = Up(8, 4)
        self.outc = nn.Conv2d(4, n_classes, kernel_size=1)

    def forward(self, x):
        x1 = self.inc(x)
        return self.outc(self.up1(self.down1(x1), x1))


def unet():
    return UNetLevel(), (torch.randn(2, 2, 8, 8),), torch.randint(0, 3, (2, 8, 8)), F.cross_entropy


# ---------------------------------------------------------------- recurrent heads
class RNNHead(nn.Module):
    def __init__(self, cell: type, input_size=3, hidden_size=5, out=2):
        super().__init__()
        self.rnn = cell(input_size, hidden_size, batch_first=True)
        self.fc = nn.Linear(hidden_size, out)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


def lstm():
    return RNNHead(nn.LSTM), (torch.randn(4, 5, 3),), torch.randn(4, 2), F.mse_loss


def gru():
    return RNNHead(nn.GRU), (torch.randn(4, 5, 3),), torch.randn(4, 2), F.mse_loss


# ---------------------------------------------------------------- depthwise-separable stack
def conv_dw(inp, oup, stride):
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp), nn.ReLU6(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU6(inplace=True))


class DepthwiseSeparable(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.model = nn.Sequential(conv_dw(3, 6, 1), conv_dw(6, 8, 2), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.model(x).view(-1, 8))


def dwsep():
    return DepthwiseSeparable(), (torch.randn(4, 3, 8, 8),), torch.randint(0, 3, (4,)), F.cross_entropy


REAL_ZOO = {"mobilenet_v3_eval": mobilenet_v3_eval, "mobilenet_v3_train": mobilenet_v3_train, "resnet": resnet,
            "vit": vit, "gpt": gpt, "gpt2": gpt2, "unet": unet, "lstm": lstm, "gru": gru, "dwsep": dwsep}
