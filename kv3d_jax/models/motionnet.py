"""MotionNet: kv3d_jax's own small 3D CNN that classifies the direction of motion.

Four 3x3x3 convolutions and a linear read-out of 8 directions (0°, 45°, …, 315°;
0° = right, 90° = up), trained by ``scripts/train_motionnet.py`` on synthetic
drifting gratings, translating textures and moving dots. Its kernels are known to
encode motion, so it is the model for checking what the visualisations say about
motion. The trained weights ship with the package (``checkpoint_path()``);
``kv3d_jax.zoo.load("motionnet")`` reads them.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

from kv3d_jax.models.base import VideoModel
from kv3d_jax.models.layers import Conv3d, max_pool3d

INPUT_SHAPE = (16, 32, 32)  # (T, H, W)
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
CHANNELS = (16, 32, 64, 64)
NUM_DIRECTIONS = 8
CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4")
LAYERS = CONV_LAYERS + ("fc",)
# max-pool applied after each of these convs (after the ReLU), as (window == stride).
_POOL_AFTER = {"conv1": (1, 2, 2), "conv2": (1, 2, 2), "conv3": (2, 2, 2)}


class MotionNet(nn.Module):
    """MotionNet, channels-last.

    ``__call__(x, upto)`` takes ``x`` ``(N, T, H, W, 3)`` (normalised with ``MEAN``,
    ``STD``) and returns the output of layer ``upto``: a conv layer's output before its
    ReLU ``(N, T', H', W', C)``, or for ``fc`` the 8 direction logits as
    ``(N, 1, 1, 1, 8)`` (the logits of the space-time mean of ``relu(conv4)``).
    """

    @nn.compact
    def __call__(self, x: jax.Array, upto: str) -> jax.Array:
        for name, channels in zip(CONV_LAYERS, CHANNELS):
            x = Conv3d(channels, (3, 3, 3), padding=((1, 1),) * 3, name=name)(x)
            if name == upto:
                return x
            x = nn.relu(x)
            if name in _POOL_AFTER:
                window = _POOL_AFTER[name]
                x = max_pool3d(x, window, window)
        logits = nn.Dense(NUM_DIRECTIONS, name="fc")(x.mean(axis=(1, 2, 3)))
        if upto == "fc":
            return logits[:, None, None, None, :]
        raise ValueError(f"MotionNet has no layer {upto!r}; valid layers are: {', '.join(LAYERS)}")


def model() -> VideoModel:
    """MotionNet as a :class:`VideoModel`: 16x32x32 clips, inputs in [0, 1] normalised with mean 0.5, std 0.25."""
    module = MotionNet()
    return VideoModel(
        name="motionnet",
        apply=lambda params, video, upto: module.apply(params, video, upto),
        layers=LAYERS,
        input_shape=INPUT_SHAPE,
        mean=MEAN,
        std=STD,
        linear_layers=frozenset({"conv1"}),
    )


def init_params(key: jax.Array) -> dict:
    """Random MotionNet params (Flax default init), for tests."""
    return MotionNet().init(key, jnp.zeros((1, *INPUT_SHAPE, 3)), "fc")


def checkpoint_path() -> Path:
    """Path of the shipped trained checkpoint, a ``torch.save`` state dict (``motionnet.pt``)."""
    return Path(str(resources.files("kv3d_jax") / "assets" / "motionnet.pt"))

