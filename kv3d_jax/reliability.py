"""How far to trust a kernel's pictures, from the kernel's own optimisation and decomposition.

Nothing here looks at gratings, labels or other kernels. Three readings combine into one
score in [0, 1]:

* ``gain``: how far stage 1's objective rose above what random videos give the same kernel,
  in units of the random videos' spread. A kernel whose optimum does not beat random
  videos clearly (``gain < DEAD_GAIN``), or whose activation is nowhere positive even on
  its own optimal video (a ReLU after it would silence it), is ``dead``: its video is
  noise and its motion means nothing.
* ``explained`` (:func:`kv3d_jax.motion.explained`): the fraction of the reconstruction's
  frame-to-frame change that the dominant translation accounts for; low for flicker,
  incoherent motion or a still video.
* ``aliased`` (:func:`kv3d_jax.motion.aliased`): the speed cannot be told from a temporal
  alias, so the read-out of the motion is ambiguous.

``reliability = (1 - exp(-gain / GAIN_SCALE)) * explained``, halved when aliased, 0 when
dead; a kernel is ``reliable`` at ``reliability >= RELIABLE``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kv3d_jax import maximization
from kv3d_jax.models.base import Params, VideoModel

# Random videos a baseline draws per kernel.
BASELINE_VIDEOS = 8
# Below this many baseline spreads above the random videos' mean, a kernel is dead.
DEAD_GAIN = 3.0
# The gain at which the objective's share of the score reaches 1 - 1/e.
GAIN_SCALE = 10.0
# The score at and above which a kernel counts as reliable.
RELIABLE = 0.5


def baseline(model: VideoModel, params: Params, layer: str, targets, key: jax.Array,
             config: maximization.Config, num: int = BASELINE_VIDEOS, compute_dtype=jnp.float32) -> jax.Array:
    """Stage 1's objective for ``num`` random videos, per kernel: ``(K, num)``.

    The videos are uniform noise in [0, 1] of ``config``'s shape (default the model's
    input size), shown to the model as stage 1 shows its own video (no jitter);
    ``targets`` are stage 1's: channel indices ``(K,)`` or weights ``(K, C)``.
    """
    shape = tuple(config.shape or model.input_shape)
    videos = jax.random.uniform(key, (num, *shape, 3), jnp.float32)
    return _baseline(params, videos, jnp.asarray(targets), model=model, layer=layer, config=config,
                     compute_dtype=jnp.dtype(compute_dtype))


@functools.partial(jax.jit, static_argnames=("model", "layer", "config", "compute_dtype"))
def _baseline(params, videos, targets, *, model, layer, config, compute_dtype):
    mean, std = maximization.mean_std(model, config)
    value = maximization.objective_value(model, layer, config.objective, config.rectify, compute_dtype)
    inputs = jax.vmap(lambda v: maximization.model_input(v, None, config.resize, mean, std))(videos)
    return jax.lax.map(lambda t: jax.vmap(lambda x: value(params, x, t))(inputs), targets)


def peak(model: VideoModel, params: Params, layer: str, targets, videos: jax.Array,
         config: maximization.Config, compute_dtype=jnp.float32) -> jax.Array:
    """The largest activation ``(K,)`` of each kernel over all positions of its own video
    ``videos`` ``(K, T, H, W, 3)`` (shown as stage 1 shows it, no jitter); ``targets`` are stage
    1's: channel indices ``(K,)`` or weights ``(K, C)`` (then the weighted sum of channels)."""
    return _peak(params, jnp.asarray(videos, jnp.float32), jnp.asarray(targets), model=model, layer=layer,
                 config=config, compute_dtype=jnp.dtype(compute_dtype))


@functools.partial(jax.jit, static_argnames=("model", "layer", "config", "compute_dtype"))
def _peak(params, videos, targets, *, model, layer, config, compute_dtype):
    mean, std = maximization.mean_std(model, config)
    params = jax.tree.map(lambda x: x.astype(compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)

    def one(args):
        video, target = args
        x = maximization.model_input(video, None, config.resize, mean, std).astype(compute_dtype)[None]
        act = model.features(params, x, layer)[0].astype(jnp.float32)
        chosen = act @ target if target.ndim else jnp.take(act, target, axis=-1)
        return jnp.max(chosen)

    return jax.lax.map(one, (videos, targets))


def gain(objective: jax.Array, random: jax.Array) -> jax.Array:
    """``(objective - mean) / spread`` ``(K,)`` of each kernel's ``objective`` ``(K,)`` over its
    random videos' objectives ``random`` ``(K, N)``; the spread is their standard deviation,
    floored at 1e-3 of their mean magnitude (or 1e-12) so that a kernel deaf to noise still scores."""
    mean, std = jnp.mean(random, axis=-1), jnp.std(random, axis=-1)
    spread = jnp.maximum(std, 1e-3 * jnp.abs(mean) + 1e-12)
    return (jnp.asarray(objective) - mean) / spread


def dead(peak_: jax.Array, gain_: jax.Array) -> jax.Array:
    """Whether each kernel is dead ``(K,)``: its largest activation ``peak_`` ``(K,)`` on its own
    video is not positive, or its objective rose less than :data:`DEAD_GAIN` spreads above
    random videos' (``gain_`` ``(K,)``)."""
    return ~(jnp.asarray(peak_) > 0) | ~(gain_ >= DEAD_GAIN)


def score(gain_: jax.Array, explained: jax.Array, aliased: jax.Array, dead_: jax.Array) -> jax.Array:
    """Reliability ``(K,)`` in [0, 1] (module doc); NaN inputs score 0."""
    value = (1.0 - jnp.exp(-jnp.maximum(gain_, 0.0) / GAIN_SCALE)) * jnp.clip(explained, 0.0, 1.0)
    value = jnp.where(aliased, 0.5 * value, value)
    return jnp.nan_to_num(jnp.where(dead_, 0.0, value))


def reliable(reliability: jax.Array) -> jax.Array:
    """Whether each reliability ``(K,)`` reaches :data:`RELIABLE`."""
    return jnp.asarray(reliability) >= RELIABLE
