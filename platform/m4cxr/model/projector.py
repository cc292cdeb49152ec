"""C-Abstractor (Honeybee): the projector from vision-encoder patch tokens to LLM embeddings.

Layer by layer: learnable positional embedding -> tokens to a square map -> RegNet stage
(encoder_dim -> hidden) -> adaptive average pooling to a grid x grid -> RegNet stage
(hidden -> hidden) -> tokens -> readout MLP (Linear, then (SiLU, Linear) x (mlp_depth - 1)).
The RegNet bottleneck block follows timm's defaults as Honeybee uses them (bottleneck ratio 1,
depthwise 3x3, squeeze-excitation 0.25 of the input channels, channel LayerNorm, SiLU); written
out here rather than taking timm as a dependency for one block.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (batch, channels, height, width) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * scale.sigmoid()


class RegNetBottleneck(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, se_ratio: float = 0.25):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), LayerNorm2d(out_channels), nn.SiLU())
        self.conv2 = nn.Sequential(  # depthwise: group size 1
            nn.Conv2d(out_channels, out_channels, 3, padding=1, groups=out_channels, bias=False),
            LayerNorm2d(out_channels), nn.SiLU())
        self.se = SqueezeExcite(out_channels, int(round(in_channels * se_ratio)))
        self.conv3 = nn.Sequential(nn.Conv2d(out_channels, out_channels, 1, bias=False), LayerNorm2d(out_channels))
        self.shortcut = (nn.Identity() if in_channels == out_channels else
                         nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), LayerNorm2d(out_channels)))
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv3(self.se(self.conv2(self.conv1(x)))) + self.shortcut(x))


def regnet_stage(depth: int, in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(*[RegNetBottleneck(in_channels if i == 0 else out_channels, out_channels) for i in range(depth)])


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
        self.s1 = regnet_stage(depth, encoder_dim, hidden_size)
        self.pool = nn.AdaptiveAvgPool2d((self.grid, self.grid))
        self.s2 = regnet_stage(depth, hidden_size, hidden_size)
        layers: list[nn.Module] = [nn.Linear(hidden_size, llm_dim)]
        for _ in range(mlp_depth - 1):
            layers += [nn.SiLU(), nn.Linear(llm_dim, llm_dim)]
        self.readout = nn.Sequential(*layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(images, N, encoder_dim) patch tokens -> (images, num_query_tokens, llm_dim)."""
        x = tokens + self.pos_emb
        b, n, d = x.shape
        x = x.transpose(1, 2).reshape(b, d, self.input_side, self.input_side)
        x = self.s2(self.pool(self.s1(x)))
        return self.readout(x.flatten(2).transpose(1, 2))
