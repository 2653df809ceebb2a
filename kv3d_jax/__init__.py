"""kv3d_jax: what a 3D convolution has learned, for every channel of a layer at once."""

from kv3d_jax import models

__all__ = ["models"]
