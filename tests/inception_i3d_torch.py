"""piergiaj/pytorch-i3d's ``InceptionI3d`` (``pytorch_i3d.py``), written from its source, with the
same module tree, so its ``state_dict`` names are those of ``rgb_imagenet.pt`` and FVD's
``i3d_pretrained_400.pt``. kv3d's Inception-I3D is checked against it; kv3d_jax does not import it.

Its own "SAME" padding: ``F.pad`` with zeros before every convolution and max-pool (the max-pools
read post-ReLU maps, where a zero never beats the window's maximum).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _same_pad(x: torch.Tensor, kernel, stride) -> torch.Tensor:
    """piergiaj's ``compute_pad``: total ``max(k - s, 0)`` if the size divides by the stride, else
    ``max(k - size % s, 0)``, the odd pixel after."""
    pads = []
    for dim, (k, s) in enumerate(zip(kernel, stride)):
        size = x.shape[2 + dim]
        total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
        pads.append((total // 2, total - total // 2))
    (t0, t1), (h0, h1), (w0, w1) = pads
    return F.pad(x, (w0, w1, h0, h1, t0, t1))


class MaxPool3dSamePadding(nn.MaxPool3d):
    def forward(self, x):
        return super().forward(_same_pad(x, self.kernel_size, self.stride))


class Unit3D(nn.Module):
    def __init__(self, in_channels, output_channels, kernel_shape=(1, 1, 1), stride=(1, 1, 1),
                 activation_fn=F.relu, use_batch_norm=True, use_bias=False, eps=1e-3):
        super().__init__()
        self._kernel_shape, self._stride = tuple(kernel_shape), tuple(stride)
        self._activation_fn, self._use_batch_norm = activation_fn, use_batch_norm
        self.conv3d = nn.Conv3d(in_channels, output_channels, kernel_shape, stride, padding=0, bias=use_bias)
        if use_batch_norm:
            self.bn = nn.BatchNorm3d(output_channels, eps=eps, momentum=0.01)

    def forward(self, x):
        x = self.conv3d(_same_pad(x, self._kernel_shape, self._stride))
        if self._use_batch_norm:
            x = self.bn(x)
        return x if self._activation_fn is None else self._activation_fn(x)


class InceptionModule(nn.Module):
    def __init__(self, in_channels, out_channels, eps):
        super().__init__()
        self.b0 = Unit3D(in_channels, out_channels[0], eps=eps)
        self.b1a = Unit3D(in_channels, out_channels[1], eps=eps)
        self.b1b = Unit3D(out_channels[1], out_channels[2], (3, 3, 3), eps=eps)
        self.b2a = Unit3D(in_channels, out_channels[3], eps=eps)
        self.b2b = Unit3D(out_channels[3], out_channels[4], (3, 3, 3), eps=eps)
        self.b3a = MaxPool3dSamePadding(kernel_size=(3, 3, 3), stride=(1, 1, 1), padding=0)
        self.b3b = Unit3D(in_channels, out_channels[5], eps=eps)

    def forward(self, x, taps=None):
        outputs = {"b0": self.b0(x), "b1a": self.b1a(x), "b2a": self.b2a(x)}
        outputs["b1b"] = self.b1b(outputs["b1a"])
        outputs["b2b"] = self.b2b(outputs["b2a"])
        outputs["b3b"] = self.b3b(self.b3a(x))
        if taps is not None:
            taps.update(outputs)
        return torch.cat([outputs[k] for k in ("b0", "b1b", "b2b", "b3b")], dim=1)


_BLOCKS = (
    ("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
    ("MaxPool3d_4a_3x3", (3, 3, 3), (2, 2, 2)),
    ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)),
    ("MaxPool3d_5a_2x2", (2, 2, 2), (2, 2, 2)),
    ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128)),
)


class InceptionI3d(nn.Module):
    """piergiaj's ``InceptionI3d(num_classes, in_channels=3)`` with every endpoint built; ``eps`` is
    its BatchNorm's (1e-3 in piergiaj's code, 1e-5 in FVD's copy)."""

    def __init__(self, num_classes=400, eps=1e-3):
        super().__init__()
        self.end_points = {}
        self.add_module("Conv3d_1a_7x7", Unit3D(3, 64, (7, 7, 7), (2, 2, 2), eps=eps))
        self.add_module("MaxPool3d_2a_3x3", MaxPool3dSamePadding(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=0))
        self.add_module("Conv3d_2b_1x1", Unit3D(64, 64, eps=eps))
        self.add_module("Conv3d_2c_3x3", Unit3D(64, 192, (3, 3, 3), eps=eps))
        self.add_module("MaxPool3d_3a_3x3", MaxPool3dSamePadding(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=0))
        for name, a, b in _BLOCKS:
            if name.startswith("Mixed"):
                self.add_module(name, InceptionModule(a, b, eps))
            else:
                self.add_module(name, MaxPool3dSamePadding(kernel_size=a, stride=b, padding=0))
        self.avg_pool = nn.AvgPool3d(kernel_size=(2, 7, 7), stride=(1, 1, 1))
        self.dropout = nn.Dropout(0.5)
        self.logits = Unit3D(1024, num_classes, activation_fn=None, use_batch_norm=False, use_bias=True)
        self._order = ["Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3",
                       "MaxPool3d_3a_3x3"] + [b[0] for b in _BLOCKS]

    def forward(self, x, logits=True):
        """Every endpoint by kv3d's layer name (NCTHW tensors), Logits averaged over time as DeepMind's."""
        taps = {}
        for name in self._order:
            module = self._modules[name]
            if isinstance(module, InceptionModule):
                branches = {}
                x = module(x, branches)
                for short, deepmind in (("b0", "Branch_0_Conv3d_0a_1x1"), ("b1a", "Branch_1_Conv3d_0a_1x1"),
                                        ("b1b", "Branch_1_Conv3d_0b_3x3"), ("b2a", "Branch_2_Conv3d_0a_1x1"),
                                        ("b2b", "Branch_2_Conv3d_0b_3x3"), ("b3b", "Branch_3_Conv3d_0b_1x1")):
                    taps[f"{name}_{deepmind}"] = branches[short]
            else:
                x = module(x)
            taps[name] = x
        if logits:
            scores = self.logits(self.dropout(self.avg_pool(x))).squeeze(3).squeeze(3)  # (N, classes, T)
            taps["Logits"] = scores.mean(2)
        return taps


def randomize_batch_norm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Gives every BatchNorm a non-trivial scale, shift and running statistics (defaults are 1, 0, 0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm3d):
                c = module.num_features
                module.weight.copy_(0.5 + torch.rand(c, generator=generator))
                module.bias.copy_(0.2 * torch.randn(c, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.01 + torch.rand(c, generator=generator))
    return model
