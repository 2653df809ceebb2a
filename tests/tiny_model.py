"""A two-convolution video model for the tests whose property needs no real network: every stage
compiles on it in a moment."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from kv3d_jax.models import VideoModel


class _Tiny(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, upto):
        x = nn.Conv(4, (3, 3, 3), padding="SAME", name="a")(x)
        if upto == "a":
            return x
        return nn.Conv(self.features, (2, 3, 3), padding="SAME", name="b")(nn.relu(x))


def tiny(shape: tuple[int, int, int], features: int = 6) -> tuple[VideoModel, dict]:
    """``(model, params)`` of a model named ``tiny`` on clips ``shape`` ``(T, H, W)``: layer ``a``
    (4 channels, a 3x3x3 convolution of the input, so linear in it) and layer ``b`` (``features``
    channels, a 2x3x3 convolution of ``a`` after a ReLU); params drawn from key 3."""
    module = _Tiny(features)
    model = VideoModel(name="tiny", apply=lambda p, v, upto: module.apply(p, v, upto), layers=("a", "b"),
                       input_shape=tuple(shape), mean=(0.5,) * 3, std=(0.25,) * 3, linear_layers=frozenset({"a"}))
    return model, module.init(jax.random.PRNGKey(3), np.zeros((1, *shape, 3), np.float32), "b")
