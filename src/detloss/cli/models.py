"""Tiny detectors for the demo: one small convolutional backbone, one head per loss family.

The backbone (:class:`Backbone`) maps ``(B, 3, S, S)`` images to three feature maps of stride
8, 16 and 32 (GroupNorm, so a data-parallel shard computes exactly what the whole batch
would). A head (:mod:`detloss.cli.heads`) adds the family's prediction layers, its priors or
anchors, the native detloss loss, and the decoding of predictions into detections.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

STRIDES = (8, 16, 32)


def conv_block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, GroupNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
        nn.GroupNorm(8, cout),
        nn.ReLU(inplace=True),
    )


class Backbone(nn.Module):
    """A plain stride-2 conv stack with a light top-down (FPN-like) fusion.

    ``forward(images (B, 3, S, S)) -> [P3 (B, W, S/8, S/8), P4 (S/16), P5 (S/32)]``, ``S`` a
    multiple of 32, ``W = width`` channels each.
    """

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.c3 = nn.Sequential(
            conv_block(3, 16, 2), conv_block(16, 32, 2), conv_block(32, 32),
            conv_block(32, 64, 2), conv_block(64, 64),
        )
        self.c4 = nn.Sequential(conv_block(64, 96, 2), conv_block(96, 96))
        self.c5 = nn.Sequential(conv_block(96, 128, 2), conv_block(128, 128))
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in (64, 96, 128))
        self.smooth = nn.ModuleList(conv_block(width, width) for _ in range(3))

    def forward(self, images: Tensor) -> list[Tensor]:
        c3 = self.c3(images)
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        p5 = self.lateral[2](c5)
        p4 = self.lateral[1](c4) + nn.functional.interpolate(p5, scale_factor=2.0, mode="nearest")
        p3 = self.lateral[0](c3) + nn.functional.interpolate(p4, scale_factor=2.0, mode="nearest")
        return [s(p) for s, p in zip(self.smooth, (p3, p4, p5))]


class LevelPredictor(nn.Module):
    """Per feature level: a 3x3 conv tower and one 3x3 conv predicting ``A * K`` channels,
    reshaped to ``(B, H * W * A, K)`` in (row, column, anchor) order and concatenated over
    levels, which is the prior/anchor order of every detloss prior generator."""

    def __init__(self, width: int, anchors_per_level: Sequence[int], channels: int, bias: float = 0.0) -> None:
        super().__init__()
        self.channels = channels
        self.anchors = tuple(anchors_per_level)
        self.tower = nn.ModuleList(conv_block(width, width) for _ in self.anchors)
        self.out = nn.ModuleList(nn.Conv2d(width, a * channels, 3, 1, 1) for a in self.anchors)
        for conv in self.out:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.constant_(conv.bias, bias)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        outs = []
        for feat, tower, out in zip(features, self.tower, self.out):
            y = out(tower(feat))  # (B, A*K, H, W)
            outs.append(y.permute(0, 2, 3, 1).reshape(y.shape[0], -1, self.channels))
        return torch.cat(outs, dim=1)


class Detector(nn.Module):
    """Backbone + family head. ``forward(images)`` returns the head's raw outputs (a dict)."""

    def __init__(self, head: nn.Module, width: int = 64) -> None:
        super().__init__()
        self.backbone = Backbone(width)
        self.head = head

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.head(self.backbone(images))
