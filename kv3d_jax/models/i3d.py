"""I3D ResNet-50 8x8 (PySlowFast config ``Kinetics/c2/I3D_8x8_R50``), channels-last, in Flax.

Mirrors PySlowFast's ``ResNet`` builder with ``MODEL.ARCH: i3d``: stem ``5x7x7`` conv,
BN, ReLU, ``1x3x3`` max pool; four stages of bottleneck blocks (stride on the ``1x3x3``
conv, ``STRIDE_1X1: False``) whose first conv has the temporal kernel of the i3d basis
``[[3], [3, 1], [3, 1], [1, 3]]`` cycled over the blocks of each stage; a ``2x1x1``
temporal max pool between ``s2`` and ``s3``; no non-local blocks. BN eps is 1e-5.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from kv3d_jax.models.base import VideoModel
from kv3d_jax.models.layers import Taps, batch_norm, conv3d, max_pool3d, run_until

_STAGE_DEPTH = (3, 4, 6, 3)
# PySlowFast _TEMPORAL_KERNEL_BASIS["i3d"]: conv1, then res2..res5.
_STEM_TEMPORAL_KERNEL = 5
_RES_TEMPORAL_KERNELS = ((3,), (3, 1), (3, 1), (1, 3))
_WIDTH = 64
_BN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class _Block:
    prefix: str          # e.g. "s2_pathway0_res0"
    dim_in: int
    dim_inner: int
    dim_out: int
    temporal_kernel: int
    stride: int

    @property
    def has_branch1(self) -> bool:
        return self.dim_in != self.dim_out or self.stride != 1

    @property
    def layers(self) -> tuple[str, ...]:
        convs = ("branch2_a", "branch2_b", "branch2_c")
        if self.has_branch1:
            convs = ("branch1",) + convs
        return tuple(f"{self.prefix}_{c}" for c in convs) + (self.prefix,)


def _blocks() -> tuple[_Block, ...]:
    blocks = []
    dim_in = _WIDTH
    for s, depth in enumerate(_STAGE_DEPTH):
        dim_inner, dim_out = _WIDTH * 2**s, _WIDTH * 4 * 2**s
        basis = _RES_TEMPORAL_KERNELS[s]
        for i in range(depth):
            # SPATIAL_STRIDES [[1], [2], [2], [2]]: the first block of s3, s4, s5 halves H and W.
            stride = 2 if s > 0 and i == 0 else 1
            blocks.append(_Block(f"s{s + 2}_pathway0_res{i}", dim_in if i == 0 else dim_out,
                                 dim_inner, dim_out, basis[i % len(basis)], stride))
        dim_in = dim_out
    return tuple(blocks)


BLOCKS = _blocks()
LAYERS = ("s1_pathway0_stem_conv", "s1_pathway0_stem") + tuple(
    name for block in BLOCKS for name in block.layers)


def _bottleneck(block: _Block, x: jax.Array) -> Taps:
    p = block.prefix
    shortcut = x
    if block.has_branch1:
        shortcut = conv3d(f"{p}_branch1", block.dim_out, 1, (1, block.stride, block.stride))(x)
        yield f"{p}_branch1", shortcut
        shortcut = batch_norm(f"{p}_branch1_bn", _BN_EPS)(shortcut)
    t = block.temporal_kernel
    h = conv3d(f"{p}_branch2_a", block.dim_inner, (t, 1, 1), padding=(t // 2, 0, 0))(x)
    yield f"{p}_branch2_a", h
    h = nn.relu(batch_norm(f"{p}_branch2_a_bn", _BN_EPS)(h))
    h = conv3d(f"{p}_branch2_b", block.dim_inner, (1, 3, 3), (1, block.stride, block.stride),
               padding=(0, 1, 1))(h)
    yield f"{p}_branch2_b", h
    h = nn.relu(batch_norm(f"{p}_branch2_b_bn", _BN_EPS)(h))
    h = conv3d(f"{p}_branch2_c", block.dim_out, 1)(h)
    yield f"{p}_branch2_c", h
    h = nn.relu(shortcut + batch_norm(f"{p}_branch2_c_bn", _BN_EPS)(h))
    yield p, h
    return h


def _forward(x: jax.Array) -> Taps:
    k = _STEM_TEMPORAL_KERNEL
    x = conv3d("s1_pathway0_stem_conv", _WIDTH, (k, 7, 7), (1, 2, 2), (k // 2, 3, 3))(x)
    yield "s1_pathway0_stem_conv", x
    x = nn.relu(batch_norm("s1_pathway0_stem_bn", _BN_EPS)(x))
    x = max_pool3d(x, (1, 3, 3), (1, 2, 2), (0, 1, 1))
    yield "s1_pathway0_stem", x
    for block in BLOCKS:
        if block.prefix == "s3_pathway0_res0":
            x = max_pool3d(x, (2, 1, 1), (2, 1, 1))  # PySlowFast's pathway0_pool
        x = yield from _bottleneck(block, x)


class I3D(nn.Module):
    """The I3D-R50 trunk; ``__call__(x, upto)`` takes ``x`` ``(N, T, H, W, 3)`` and returns
    the output of layer ``upto`` (or a dict, for a sequence of names), channels-last."""

    @nn.compact
    def __call__(self, x: jax.Array, upto):
        return run_until(_forward(x), upto, LAYERS)


def model() -> VideoModel:
    """I3D ResNet-50 8x8 on Kinetics-400 (PySlowFast): 8x224x224 clips, mean 0.45, std 0.225."""
    module = I3D()
    return VideoModel(
        name="i3d_r50",
        apply=lambda params, video, upto: module.apply(params, video, upto),
        layers=LAYERS,
        input_shape=(8, 224, 224),
        mean=(0.45, 0.45, 0.45),
        std=(0.225, 0.225, 0.225),
        linear_layers=frozenset({"s1_pathway0_stem_conv"}),
    )


def init_params(key: jax.Array) -> dict:
    """Random I3D variables (Flax default init, unit BN statistics), for tests and benchmarks."""
    return I3D().init(key, jnp.zeros((1, 8, 32, 32, 3)), LAYERS[-1])
