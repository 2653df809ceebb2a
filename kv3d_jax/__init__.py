"""kv3d_jax: what a 3D convolution has learned, for every channel of a layer at once."""

from kv3d_jax import models
from kv3d_jax.decomposition import decompose
from kv3d_jax.maximization import maximize
from kv3d_jax.motion import motion_summary
from kv3d_jax.refinement import refine

__all__ = ["decompose", "maximize", "models", "motion_summary", "refine"]
