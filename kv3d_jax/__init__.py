"""kv3d_jax: what a 3D convolution has learned, for every channel of a layer at once."""

from kv3d_jax import models
from kv3d_jax.decompose import decompose
from kv3d_jax.maximize import maximize
from kv3d_jax.motion import motion_summary

__all__ = ["decompose", "maximize", "models", "motion_summary"]
