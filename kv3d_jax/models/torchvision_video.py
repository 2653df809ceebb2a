"""torchvision's video classifiers R3D-18, MC3-18, R(2+1)D-18 and S3D, channels-last, in Flax.

Module names follow ``torchvision.models.video`` (``resnet.py``, ``s3d.py``) with ``.``
replaced by ``_``, so ``layer1_0_conv1_0`` is ``model.layer1[0].conv1[0]``. Every
``Conv3d`` is a tappable layer, and so is the output of every residual block
(``layer2_1``) or inception block (``features_8``), which is after its ReLU.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from kv3d_jax.models.base import VideoModel
from kv3d_jax.models.layers import Taps, batch_norm, conv3d, max_pool3d, run_until

# torchvision's VideoClassification preset (the Kinetics-400 statistics of the R(2+1)D paper).
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)

ConvKind = Literal["3d", "no_temporal", "2plus1d"]


@dataclasses.dataclass(frozen=True)
class _ResNetSpec:
    name: str
    stem: Literal["basic", "r2plus1d"]
    convs: tuple[ConvKind, ConvKind, ConvKind, ConvKind]  # conv builder of layer1..layer4


RESNETS = {
    "r3d_18": _ResNetSpec("r3d_18", "basic", ("3d",) * 4),
    "mc3_18": _ResNetSpec("mc3_18", "basic", ("3d",) + ("no_temporal",) * 3),
    "r2plus1d_18": _ResNetSpec("r2plus1d_18", "r2plus1d", ("2plus1d",) * 4),
}
_PLANES = (64, 128, 256, 512)
_BLOCKS_PER_LAYER = 2


def _conv_names(prefix: str, kind: ConvKind) -> tuple[str, ...]:
    """The Conv3d module(s) of one ``conv_builder``: ``Conv2Plus1D`` is a Sequential of two."""
    return (f"{prefix}_0", f"{prefix}_3") if kind == "2plus1d" else (prefix,)


def _resnet_blocks(spec: _ResNetSpec):
    """``(prefix, in_planes, planes, stride, conv kind)`` of every BasicBlock, in order."""
    in_planes = 64
    for i, (planes, kind) in enumerate(zip(_PLANES, spec.convs)):
        for b in range(_BLOCKS_PER_LAYER):
            stride = 2 if i > 0 and b == 0 else 1
            yield f"layer{i + 1}_{b}", in_planes, planes, stride, kind
            in_planes = planes


def resnet_layers(spec: _ResNetSpec) -> tuple[str, ...]:
    """Tappable layers of a VideoResNet-18: every conv, in forward order, and every block output."""
    names = ["stem_0", "stem_3"] if spec.stem == "r2plus1d" else ["stem_0"]
    for prefix, in_planes, planes, stride, kind in _resnet_blocks(spec):
        if stride != 1 or in_planes != planes:
            names.append(f"{prefix}_downsample_0")
        names += _conv_names(f"{prefix}_conv1_0", kind) + _conv_names(f"{prefix}_conv2_0", kind)
        names.append(prefix)
    return tuple(names)


def _conv_builder(prefix: str, x: jax.Array, kind: ConvKind, planes: int, stride: int,
                  midplanes: int) -> Taps:
    """torchvision's Conv3DSimple / Conv3DNoTemporal / Conv2Plus1D; yields each conv, returns the last."""
    if kind == "3d":
        x = conv3d(prefix, planes, 3, stride, 1)(x)
        yield prefix, x
        return x
    if kind == "no_temporal":
        x = conv3d(prefix, planes, (1, 3, 3), (1, stride, stride), (0, 1, 1))(x)
        yield prefix, x
        return x
    x = conv3d(f"{prefix}_0", midplanes, (1, 3, 3), (1, stride, stride), (0, 1, 1))(x)
    yield f"{prefix}_0", x
    x = nn.relu(batch_norm(f"{prefix}_1")(x))
    x = conv3d(f"{prefix}_3", planes, (3, 1, 1), (stride, 1, 1), (1, 0, 0))(x)
    yield f"{prefix}_3", x
    return x


def _basic_block(prefix: str, x: jax.Array, in_planes: int, planes: int, stride: int,
                 kind: ConvKind) -> Taps:
    # torchvision computes one midplanes per block, from (inplanes, planes), for both convs.
    midplanes = (in_planes * planes * 27) // (in_planes * 9 + 3 * planes)
    shortcut = x
    if stride != 1 or in_planes != planes:
        ds_stride = (1, stride, stride) if kind == "no_temporal" else stride
        shortcut = conv3d(f"{prefix}_downsample_0", planes, 1, ds_stride)(x)
        yield f"{prefix}_downsample_0", shortcut
        shortcut = batch_norm(f"{prefix}_downsample_1")(shortcut)
    h = yield from _conv_builder(f"{prefix}_conv1_0", x, kind, planes, stride, midplanes)
    h = nn.relu(batch_norm(f"{prefix}_conv1_1")(h))
    h = yield from _conv_builder(f"{prefix}_conv2_0", h, kind, planes, 1, midplanes)
    h = nn.relu(batch_norm(f"{prefix}_conv2_1")(h) + shortcut)
    yield prefix, h
    return h


def _resnet_forward(spec: _ResNetSpec, x: jax.Array) -> Taps:
    if spec.stem == "basic":
        x = conv3d("stem_0", 64, (3, 7, 7), (1, 2, 2), (1, 3, 3))(x)
        yield "stem_0", x
        x = nn.relu(batch_norm("stem_1")(x))
    else:
        x = conv3d("stem_0", 45, (1, 7, 7), (1, 2, 2), (0, 3, 3))(x)
        yield "stem_0", x
        x = nn.relu(batch_norm("stem_1")(x))
        x = conv3d("stem_3", 64, (3, 1, 1), 1, (1, 0, 0))(x)
        yield "stem_3", x
        x = nn.relu(batch_norm("stem_4")(x))
    for prefix, in_planes, planes, stride, kind in _resnet_blocks(spec):
        x = yield from _basic_block(prefix, x, in_planes, planes, stride, kind)


class VideoResNet(nn.Module):
    """torchvision's ``VideoResNet`` trunk (BasicBlock, 2-2-2-2) for one of :data:`RESNETS`."""

    spec: _ResNetSpec

    @nn.compact
    def __call__(self, x: jax.Array, upto):
        return run_until(_resnet_forward(self.spec, x), upto, resnet_layers(self.spec))


# ---------------------------------------------------------------------------- S3D

_S3D_EPS = 1e-3
# SepInceptionBlock3D arguments (b0_out, b1_mid, b1_out, b2_mid, b2_out, b3_out) by index in
# ``features``; the other indices are the stem and the max pools.
_INCEPTION = {
    5: (64, 96, 128, 16, 32, 32),
    6: (128, 128, 192, 32, 96, 64),
    8: (192, 96, 208, 16, 48, 64),
    9: (160, 112, 224, 24, 64, 64),
    10: (128, 128, 256, 24, 64, 64),
    11: (112, 144, 288, 32, 64, 64),
    12: (256, 160, 320, 32, 128, 128),
    14: (256, 160, 320, 32, 128, 128),
    15: (384, 192, 384, 48, 128, 128),
}
# features index -> (window, stride, padding) of its MaxPool3d.
_S3D_POOLS = {1: ((1, 3, 3), (1, 2, 2), (0, 1, 1)), 4: ((1, 3, 3), (1, 2, 2), (0, 1, 1)),
              7: (3, 2, 1), 13: (2, 2, 0)}


def _inception_layers(i: int) -> tuple[str, ...]:
    p = f"features_{i}"
    return (f"{p}_branch0_0",
            f"{p}_branch1_0_0", f"{p}_branch1_1_0_0", f"{p}_branch1_1_1_0",
            f"{p}_branch2_0_0", f"{p}_branch2_1_0_0", f"{p}_branch2_1_1_0",
            f"{p}_branch3_1_0", p)


S3D_LAYERS = ("features_0_0_0", "features_0_1_0", "features_2_0", "features_3_0_0",
              "features_3_1_0") + tuple(n for i in _INCEPTION for n in _inception_layers(i))


def _conv_bn_relu(name: str, x: jax.Array, features: int, kernel, stride=1, padding=0) -> Taps:
    """torchvision's ``Conv3dNormActivation``: yields the conv (``name_0``), returns after BN + ReLU."""
    x = conv3d(f"{name}_0", features, kernel, stride, padding)(x)
    yield f"{name}_0", x
    return nn.relu(batch_norm(f"{name}_1", _S3D_EPS)(x))


def _temporal_separable(name: str, x: jax.Array, features: int, k: int, stride: int, pad: int) -> Taps:
    """``TemporalSeparableConv``: a ``1xkxk`` then a ``kx1x1`` Conv3dNormActivation."""
    x = yield from _conv_bn_relu(f"{name}_0", x, features, (1, k, k), (1, stride, stride), (0, pad, pad))
    return (yield from _conv_bn_relu(f"{name}_1", x, features, (k, 1, 1), (stride, 1, 1), (pad, 0, 0)))


def _inception(i: int, x: jax.Array) -> Taps:
    b0, b1_mid, b1, b2_mid, b2, b3 = _INCEPTION[i]
    p = f"features_{i}"
    x0 = yield from _conv_bn_relu(f"{p}_branch0", x, b0, 1)
    x1 = yield from _conv_bn_relu(f"{p}_branch1_0", x, b1_mid, 1)
    x1 = yield from _temporal_separable(f"{p}_branch1_1", x1, b1, 3, 1, 1)
    x2 = yield from _conv_bn_relu(f"{p}_branch2_0", x, b2_mid, 1)
    x2 = yield from _temporal_separable(f"{p}_branch2_1", x2, b2, 3, 1, 1)
    x3 = max_pool3d(x, 3, 1, 1)
    x3 = yield from _conv_bn_relu(f"{p}_branch3_1", x3, b3, 1)
    out = jnp.concatenate([x0, x1, x2, x3], axis=-1)
    yield p, out
    return out


def _s3d_forward(x: jax.Array) -> Taps:
    x = yield from _temporal_separable("features_0", x, 64, 7, 2, 3)
    x = max_pool3d(x, *_S3D_POOLS[1])
    x = yield from _conv_bn_relu("features_2", x, 64, 1)
    x = yield from _temporal_separable("features_3", x, 192, 3, 1, 1)
    for i in range(4, 16):
        if i in _S3D_POOLS:
            x = max_pool3d(x, *_S3D_POOLS[i])
        else:
            x = yield from _inception(i, x)


class S3D(nn.Module):
    """torchvision's ``S3D`` feature trunk (``features``), BN eps 1e-3."""

    @nn.compact
    def __call__(self, x: jax.Array, upto):
        return run_until(_s3d_forward(x), upto, S3D_LAYERS)


# ---------------------------------------------------------------------------- registry

def _module_and_layers(name: str) -> tuple[nn.Module, tuple[str, ...]]:
    if name == "s3d":
        return S3D(), S3D_LAYERS
    return VideoResNet(RESNETS[name]), resnet_layers(RESNETS[name])


NAMES = ("r3d_18", "mc3_18", "r2plus1d_18", "s3d")


def _first_convs(name: str) -> frozenset[str]:
    return frozenset({"features_0_0_0"} if name == "s3d" else {"stem_0"})


def model(name: str) -> VideoModel:
    """torchvision's ``name`` (one of :data:`NAMES`), Kinetics-400: 16x112x112 clips (S3D:
    16x224x224), normalised with torchvision's video preset statistics."""
    module, layers = _module_and_layers(name)
    return VideoModel(
        name=name,
        apply=lambda params, video, upto: module.apply(params, video, upto),
        layers=layers,
        input_shape=(16, 224, 224) if name == "s3d" else (16, 112, 112),
        mean=KINETICS_MEAN,
        std=KINETICS_STD,
        linear_layers=_first_convs(name),
    )


def init_params(name: str, key: jax.Array) -> dict:
    """Random variables of model ``name`` (Flax default init, unit BN statistics)."""
    module, layers = _module_and_layers(name)
    t, hw = (16, 32) if name == "s3d" else (8, 16)
    return module.init(key, jnp.zeros((1, t, hw, hw, 3)), layers[-1])
