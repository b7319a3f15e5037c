"""Image models: a small CNN, and MONAI's DenseNet-121 in 2-D. One logit per image.

Both take examples of shape (channels, height, width). Their normalisation layers follow the
study: ``norm: auto`` is GroupNorm when the study trains with DP-SGD (BatchNorm mixes the
rows of a batch, so one row's influence could not be bounded) and BatchNorm otherwise.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from fedstudy.spec import Model

Norm = Literal["batch", "group", "none"]

# DenseNet-121 halves its input five times (a strided convolution, a max-pooling and three
# transitions): smaller images leave nothing for the last pooling.
DENSENET_MIN_SIZE = 32
DENSENET_GROUPS = 32  # every DenseNet-121 layer has a multiple of 32 channels


def resolve_norm(model: Model, private: bool) -> Norm:
    if model.norm == "auto":
        return "group" if private else "batch"
    return model.norm


def group_count(channels: int) -> int:
    """Groups of a GroupNorm over ``channels``: the largest divisor that is at most 8."""
    return math.gcd(channels, 8)


def _norm_layer(norm: Norm, channels: int) -> nn.Module | None:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(group_count(channels), channels)
    return None


class SmallCNN(nn.Module):
    """Per entry of ``channels``: 3x3 convolution → norm → ReLU → 2x2 max-pooling (while the
    image is at least 2 pixels high and wide); then global average pooling, dropout and a
    linear layer to one logit."""

    def __init__(
        self,
        in_channels: int,
        size: tuple[int, int],
        channels: list[int],
        norm: Norm,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = in_channels
        height, across = size
        for out in channels:
            layers: list[nn.Module] = [
                nn.Conv2d(width, out, kernel_size=3, padding=1, bias=norm == "none")
            ]
            layer = _norm_layer(norm, out)
            if layer is not None:
                layers.append(layer)
            layers.append(nn.ReLU())
            if min(height, across) >= 2:
                layers.append(nn.MaxPool2d(2))
                height, across = height // 2, across // 2
            blocks.append(nn.Sequential(*layers))
            width = out
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.pool(self.features(x)).flatten(1)
        out: torch.Tensor = self.head(self.dropout(z))
        return out.squeeze(-1)


class DenseNet121(nn.Module):
    """MONAI's DenseNet-121 (2-D) with one output, its ReLUs not in place (per-sample gradient
    hooks need the activations they saw)."""

    def __init__(self, in_channels: int, norm: Norm, dropout: float = 0.0) -> None:
        super().__init__()
        from monai.networks.nets.densenet import DenseNet121 as MonaiDenseNet121

        norm_spec: str | tuple[str, dict[str, int]] = (
            ("group", {"num_groups": DENSENET_GROUPS}) if norm == "group" else "batch"
        )
        self.net = MonaiDenseNet121(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=1,
            norm=norm_spec,
            act=("relu", {"inplace": False}),
            dropout_prob=dropout,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out.squeeze(-1)


def input_problem(model: Model, shape: tuple[int, ...]) -> str | None:
    """Why ``model`` cannot take examples of ``shape``, or None."""
    if len(shape) != 3:
        return (
            f"model {model.name} takes images (channels, height, width), not examples of "
            f"shape {shape}"
        )
    if model.name == "densenet121" and min(shape[1:]) < DENSENET_MIN_SIZE:
        return (
            f"densenet121 needs images of at least {DENSENET_MIN_SIZE}x{DENSENET_MIN_SIZE} "
            f"pixels, these are {shape[1]}x{shape[2]}; set spec.preprocessing.image.size, "
            "e.g. [224, 224]"
        )
    return None


def build_image_model(model: Model, shape: tuple[int, ...], private: bool) -> nn.Module:
    """The study's image model for examples of ``shape`` (the caller seeds torch)."""
    problem = input_problem(model, shape)
    if problem is not None:
        raise ValueError(problem)
    norm = resolve_norm(model, private)
    if model.name == "cnn":
        return SmallCNN(shape[0], (shape[1], shape[2]), list(model.channels), norm, model.dropout)
    if model.name == "densenet121":
        return DenseNet121(shape[0], norm, model.dropout)
    raise ValueError(f"model {model.name} is not an image model")
