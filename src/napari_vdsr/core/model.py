"""The VDSR network (Kim, Lee & Lee, CVPR 2016).

A plain stack of 3x3 convolutions with ReLU that predicts a residual which
is added to its (already interpolated) input.  No Qt or napari imports.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["VDSR", "receptive_field", "FLOPS_PER_PIXEL"]


class VDSR(nn.Module):
    """Very deep residual network for image restoration.

    Parameters
    ----------
    depth : int
        Number of weight (convolution) layers, ``L`` in the paper (default 20).
    width : int
        Number of feature channels of the hidden layers (default 64).
    channels : int
        Number of image channels seen by the network (1: luminance or a
        single grey / fluorescence channel).
    residual : bool
        If True (the paper's method), the output is ``x + f(x)``; otherwise the
        network predicts the image directly.

    Notes
    -----
    All convolutions use zero padding 1, so the output has the size of the
    input.  The receptive field is ``(2 * depth + 1)`` pixels wide.
    """

    def __init__(
        self,
        depth: int = 20,
        width: int = 64,
        channels: int = 1,
        residual: bool = True,
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"VDSR needs depth >= 2 weight layers, got depth={depth}.")
        if width < 1 or channels < 1:
            raise ValueError(f"width and channels must be positive, got width={width}, channels={channels}.")
        self.depth = int(depth)
        self.width = int(width)
        self.channels = int(channels)
        self.residual = bool(residual)
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.body = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He (Kaiming) initialisation, zero biases; the residual branch's last layer starts near zero."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        if self.residual:
            # start close to the identity (output = interpolated input): the He-initialised
            # residual of a 20-layer stack is otherwise of the order of the image itself
            nn.init.normal_(self.body[-1].weight, 0.0, 1e-3 * math.sqrt(1.0 / (self.width * 9)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = self.body(x)
        if self.residual:
            out = out + x
        return out

    @property
    def config(self) -> dict:
        """Constructor arguments: enough to rebuild the architecture."""
        return {"depth": self.depth, "width": self.width, "channels": self.channels, "residual": self.residual}

    def num_weights(self) -> int:
        """Number of convolution weights (biases excluded)."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Conv2d))

    def num_biases(self) -> int:
        """Number of convolution biases."""
        return sum(m.bias.numel() for m in self.modules() if isinstance(m, nn.Conv2d))

    def flops_per_pixel(self) -> float:
        """Multiply-add FLOPs (2 per MAC) the network spends per output pixel."""
        return 2.0 * self.num_weights()


def receptive_field(depth: int = 20) -> int:
    """Width in pixels of the receptive field of a ``depth``-layer VDSR."""
    return 2 * depth + 1


#: FLOPs per output pixel of the default 20-layer, 64-channel network (≈1.329 MFLOP).
FLOPS_PER_PIXEL = 2.0 * (9 * 64 + 18 * 9 * 64 * 64 + 9 * 64)
