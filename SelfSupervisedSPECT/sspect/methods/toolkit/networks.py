"""One network factory for every learned method: a small MONAI 3D U-Net with one of three heads.

Why MONAI's ``UNet`` (strided convolutions, channels f, 2f, 4f, 8f, instance norm, PReLU) rather
than ``BasicUNet``: it fits an image as well per step at a fraction of the cost (no full-resolution
double convolutions); figures in ``docs/self-supervised-report``. Heads, all starting from a known
output so that the first steps are useful:

- ``positive``: the caller takes ``c softplus(output)``; the output starts uniform at ``start_value``.
- ``correction``: the output starts at zero; the caller adds it to an image (supervised networks).
- ``residual``: ``f(x) = x + g(x)`` with ``g`` a correction head: starts as the identity (denoisers).

Upsampling: ``transposed`` (MONAI UNet's own stride-2 transposed convolutions, whose uneven
overlap can paint a checkerboard at the Nyquist frequency on smooth images: Odena, Dumoulin &
Olah, Distill 2016) or ``resize`` (trilinear interpolation, then a 3x3x3 convolution: MONAI's
``UpSample`` "nontrainable"). ``resize`` paints no checkerboard. With a correction head (the
supervised networks) it fits as well or better, so the shipped 4.4 mm networks and ``sspect train``
use it; with a positive head (dip, DL-BPF), at the hyperparameters tuned for ``transposed``, it fits
far worse and is several times slower on a CPU (docs/clinical-grid-report), so there it is an
option, not the default.
"""
from __future__ import annotations

import math

HEADS = ("positive", "correction", "residual")
UPSAMPLING = ("transposed", "resize")


def level_channels(features: int, levels: int = 4) -> tuple[int, ...]:
    return tuple(features * 2**k for k in range(levels))


def unet(features: int, in_channels: int = 1, *, head: str, levels: int = 4, start_value: float = 1.0,
         upsampling: str = "transposed"):
    """The U-Net of ``head`` (see the module docstring), ``in_channels`` -> 1 channel."""
    import torch
    from monai.networks.blocks import Convolution, UpSample
    from monai.networks.nets import UNet

    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, not {head!r}")
    if upsampling not in UPSAMPLING:
        raise ValueError(f"upsampling must be one of {UPSAMPLING}, not {upsampling!r}")
    if head == "residual" and in_channels != 1:
        raise ValueError("a residual head adds its output to its one-channel input")

    class ResizeUNet(UNet):
        """MONAI's UNet with each transposed convolution replaced by interpolation and a convolution."""

        def _get_up_layer(self, in_channels, out_channels, strides, is_top):
            convolution = Convolution(self.dimensions, in_channels, out_channels, kernel_size=self.up_kernel_size,
                                      act=self.act, norm=self.norm, dropout=self.dropout, bias=self.bias,
                                      conv_only=is_top, adn_ordering=self.adn_ordering)
            return UpSample(self.dimensions, scale_factor=strides, mode="nontrainable", pre_conv=None,
                            post_conv=convolution, interp_mode="trilinear", align_corners=False)

    network = (ResizeUNet if upsampling == "resize" else UNet)(
        spatial_dims=3, in_channels=in_channels, out_channels=1, channels=level_channels(features, levels),
        strides=(2,) * (levels - 1), num_res_units=0, norm="instance")
    output_layer = [m for m in network.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))][-1]
    with torch.no_grad():
        output_layer.weight.zero_()
        output_layer.bias.fill_(inverse_softplus_scalar(start_value) if head == "positive" else 0.0)
    if head != "residual":
        return network

    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.correction = network

        def forward(self, x):
            return x + self.correction(x)

    return Residual()


def upsampling_of(network) -> str:
    """'transposed' when the network upsamples with transposed convolutions, else 'resize'."""
    import torch

    return "transposed" if any(isinstance(m, torch.nn.ConvTranspose3d) for m in network.modules()) else "resize"


def describe(network, features: int, levels: int = 4, what: str = "MONAI UNet") -> dict:
    """What a result's info records of its network."""
    return {"network": f"{what} channels {list(level_channels(features, levels))}, strides {[2] * (levels - 1)}, "
                       f"{upsampling_of(network)} upsampling",
            "network_parameters": sum(p.numel() for p in network.parameters())}


def inverse_softplus_scalar(value: float) -> float:
    return math.log(math.expm1(max(value, 1e-6)))


def inverse_softplus(z):
    """``softplus^-1(z)`` for a tensor, stable for large ``z``."""
    import torch

    return z + torch.log(-torch.expm1(-z))


class Padding:
    """Pads [N, C, X, Y, Z] to a multiple of the U-Net's total stride (replicating the edge) and crops back."""

    def __init__(self, shape, levels: int = 4):
        step = 2 ** (levels - 1)
        self.widths = []  # F.pad order: last dimension first
        for size in reversed(tuple(shape)):
            extra = -size % step
            self.widths += [extra // 2, extra - extra // 2]
        self.window = tuple(slice(self.widths[2 * i], self.widths[2 * i] + size)
                            for i, size in enumerate(reversed(tuple(shape))))[::-1]

    def pad(self, volumes):
        import torch.nn.functional as F

        return F.pad(volumes, self.widths, mode="replicate")

    def crop(self, tensor):
        """The last three dimensions cut back to the object grid."""
        return tensor[(Ellipsis,) + self.window]


def image_scale(volumes) -> float:
    """The 99.9th percentile of ``volumes``: dividing by it gives a network inputs and outputs of order one."""
    import torch

    sample = volumes.flatten().float()[:: max(1, volumes.numel() // 1_000_000)]  # torch.quantile's size limit
    return max(float(torch.quantile(sample, 0.999)), 1e-12)
