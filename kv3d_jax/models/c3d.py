"""C3D (Tran et al. 2015) as defined by ``c3d-pytorch``, channels-last, in Flax."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kv3d_jax.models.base import VideoModel
from kv3d_jax.models.layers import Conv3d, max_pool3d

CONV_LAYERS = ("conv1", "conv2", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a", "conv5b")
CONV_CHANNELS = {"conv1": 64, "conv2": 128, "conv3a": 256, "conv3b": 256,
                 "conv4a": 512, "conv4b": 512, "conv5a": 512, "conv5b": 512}
# pool applied after each of these convs (after the ReLU), as (window == stride).
_POOL_AFTER = {"conv1": (1, 2, 2), "conv2": (2, 2, 2), "conv3b": (2, 2, 2), "conv4b": (2, 2, 2)}


class C3D(nn.Module):
    """C3D's convolutional trunk.

    ``__call__(x, upto, project=None)`` takes ``x`` ``(N, 16, 112, 112, 3)`` (any T, H, W
    works) and returns the output of conv layer ``upto`` *before* its ReLU, which is what a
    forward hook on ``c3d-pytorch``'s ``convN`` module sees; with ``project`` ``(C,)`` only
    that output's projection ``@ project``, ``(N, T', H', W', 1)``.
    """

    @nn.compact
    def __call__(self, x: jax.Array, upto: str, project: jax.Array | None = None) -> jax.Array:
        for name in CONV_LAYERS:
            conv = Conv3d(CONV_CHANNELS[name], (3, 3, 3), padding=((1, 1),) * 3, name=name)
            if name == upto:
                return conv(x, project)
            x = conv(x)
            # Max-pooling commutes with the ReLU; pooling first rectifies a quarter or an eighth as much.
            if name in _POOL_AFTER:
                window = _POOL_AFTER[name]
                x = max_pool3d(x, window, window)
            x = nn.relu(x)
        raise ValueError(f"C3D has no conv layer {upto!r}; valid layers are: {', '.join(CONV_LAYERS)}")


def model() -> VideoModel:
    """C3D trained on Sports-1M (``c3d-pytorch``): 16x112x112 RGB clips.

    Its native input is raw 0–255 pixel values (``c3d-pytorch``'s ``predict.py`` feeds them
    unnormalised), expressed here as mean 0 and std 1/255 on [0, 1] videos.
    """
    module = C3D()
    return VideoModel(
        name="c3d",
        apply=lambda params, video, upto: module.apply(params, video, upto),
        apply_projected=lambda params, video, upto, weights: module.apply(params, video, upto, weights)[..., 0],
        layers=CONV_LAYERS,
        input_shape=(16, 112, 112),
        mean=(0.0, 0.0, 0.0),
        std=(1 / 255, 1 / 255, 1 / 255),
        linear_layers=frozenset({"conv1"}),
    )


def init_params(key: jax.Array) -> dict:
    """Random C3D conv params (Flax default init), for tests and benchmarks."""
    return C3D().init(key, jnp.zeros((1, 16, 112, 112, 3)), CONV_LAYERS[-1])
