"""C-Abstractor (Honeybee): the projector from vision-encoder patch tokens to LLM embeddings.

Layer by layer: learnable positional embedding -> tokens to a square map -> RegNet stage
(encoder_dim -> hidden) -> adaptive average pooling to a grid x grid -> RegNet stage
(hidden -> hidden) -> tokens -> readout MLP (Linear, then (SiLU, Linear) x (mlp_depth - 1)).

Honeybee builds the stages from timm's `RegStage` with `act_layer=nn.SiLU` and
`norm_layer=LayerNorm2d`. timm cannot be imported where torchvision does not load (it imports
torchvision at import time), so the blocks are written out here with timm's numerics and
timm's module names: the authors' state dict (`net.0.b1.conv1.conv.weight`, `...se.fc1.bias`,
`net.2.b3.conv3.bn.weight`, `readout.2.weight`, `pos_emb`) loads into this module as it is.
tests/test_release.py holds the two equal where timm imports.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class LayerNormAct2d(nn.LayerNorm):
    """timm's LayerNormAct2d: LayerNorm over the channels of a (batch, channels, h, w) map, then
    the activation (timm turns `norm_layer=LayerNorm2d` into this one inside ConvNormAct; its
    eps is 1e-5)."""

    def __init__(self, channels: int, apply_act: bool = True):
        super().__init__(channels, eps=1e-5)
        self.act = nn.SiLU() if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return self.act(x.permute(0, 3, 1, 2))


class ConvNormAct(nn.Module):
    """timm's ConvNormAct: a bias-free conv (`conv`), then norm and activation (`bn`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, groups: int = 1,
                 apply_act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups,
                              bias=False)
        self.bn = LayerNormAct2d(out_channels, apply_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class SEModule(nn.Module):
    """timm's SEModule with the block's activation (SiLU for Honeybee, not timm's ReLU default)."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))).sigmoid()


class Bottleneck(nn.Module):
    """timm's RegNet Bottleneck as RegStage builds it here: bottleneck ratio 1, depthwise 3x3
    (group size 1), squeeze-excitation to round(0.25 x input channels), 1x1 conv without
    activation, shortcut (a 1x1 ConvNormAct where the channels change), SiLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, se_ratio: float = 0.25):
        super().__init__()
        self.conv1 = ConvNormAct(in_channels, out_channels, 1)
        self.conv2 = ConvNormAct(out_channels, out_channels, 3, groups=out_channels)
        self.se = SEModule(out_channels, int(round(in_channels * se_ratio)))
        self.conv3 = ConvNormAct(out_channels, out_channels, 1, apply_act=False)
        self.act3 = nn.SiLU()
        self.downsample = (nn.Identity() if in_channels == out_channels
                           else ConvNormAct(in_channels, out_channels, 1, apply_act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act3(self.conv3(self.se(self.conv2(self.conv1(x)))) + self.downsample(x))


class RegStage(nn.Sequential):
    """timm's RegStage (stride 1, dilation 1): blocks named b1, b2, ..."""

    def __init__(self, depth: int, in_channels: int, out_channels: int):
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", Bottleneck(in_channels if i == 0 else out_channels, out_channels))


class CAbstractor(nn.Module):
    def __init__(self, num_input_tokens: int, encoder_dim: int, llm_dim: int, hidden_size: int = 1024,
                 depth: int = 3, mlp_depth: int = 2, num_query_tokens: int = 361):
        super().__init__()
        self.input_side = math.isqrt(num_input_tokens)
        self.grid = math.isqrt(num_query_tokens)
        if self.input_side ** 2 != num_input_tokens:
            raise ValueError(f"C-Abstractor needs a square number of input tokens, got {num_input_tokens}")
        if self.grid ** 2 != num_query_tokens:
            raise ValueError(f"model.projector.num_query_tokens must be a square (e.g. 361 = 19 x 19), got {num_query_tokens}")
        self.num_query_tokens = num_query_tokens
        self.pos_emb = nn.Parameter(torch.zeros(1, num_input_tokens, encoder_dim))
        nn.init.trunc_normal_(self.pos_emb, std=0.02)
        # Honeybee's names: net = (stage 1, the pooling, stage 2)
        self.net = nn.Sequential(RegStage(depth, encoder_dim, hidden_size), nn.AdaptiveAvgPool2d(self.grid),
                                 RegStage(depth, hidden_size, hidden_size))
        layers: list[nn.Module] = [nn.Linear(hidden_size, llm_dim)]
        for _ in range(mlp_depth - 1):
            layers += [nn.SiLU(), nn.Linear(llm_dim, llm_dim)]
        self.readout = nn.Sequential(*layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(images, N, encoder_dim) patch tokens -> (images, num_query_tokens, llm_dim)."""
        x = tokens + self.pos_emb
        b, n, d = x.shape
        x = self.net(x.transpose(1, 2).reshape(b, d, self.input_side, self.input_side))
        return self.readout(x.flatten(2).transpose(1, 2))
