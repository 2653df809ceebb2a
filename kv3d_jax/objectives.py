"""What stage 1 maximises (Lucid's *objectives*; SPEC §2 item 6).

An objective maps one clip's activation ``act`` ``(T', H', W', C)`` of the tapped layer and
a kernel's ``target`` to the scalar to *maximise*; the optimiser minimises its negative.
The target is a channel index for ``channel`` and ``neuron``, and a weight vector ``(C,)``
for ``weighted``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Objective = Callable[[jax.Array, jax.Array], jax.Array]


def channel(act: jax.Array, target: jax.Array) -> jax.Array:
    """``mean_{t,y,x} act[t, y, x, target]``: the mean activation of one channel."""
    return jnp.mean(jnp.take(act, target, axis=-1))


def neuron(act: jax.Array, target: jax.Array) -> jax.Array:
    """``act[T'//2, H'//2, W'//2, target]``: the channel's activation at the centre of the clip."""
    t, h, w = act.shape[:3]
    return jnp.take(act[t // 2, h // 2, w // 2], target, axis=-1)


def weighted(act: jax.Array, target: jax.Array) -> jax.Array:
    """``mean_{t,y,x} Σ_c target[c] act[t, y, x, c]``: a weighted sum of channel means."""
    return jnp.mean(act @ target)


def rectified(objective: Objective) -> Objective:
    """``objective`` applied to ``relu(act)``: the activation tapped after a ReLU."""
    return lambda act, target: objective(jax.nn.relu(act), target)


OBJECTIVES: dict[str, Objective] = {"channel": channel, "neuron": neuron, "weighted": weighted}

# Objectives that average a channel over the clip: on a layer that is linear in the input
# their optimum is a flat colour (SPEC §5).
SPATIAL_MEANS = frozenset({"channel", "weighted"})


def get(name: str, rectify: bool = False) -> Objective:
    """The objective registered as ``name``, optionally rectified; a clear error lists the names."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid objectives are: {', '.join(OBJECTIVES)}")
    return rectified(OBJECTIVES[name]) if rectify else OBJECTIVES[name]


class Projection(NamedTuple):
    """An objective that reads one channel, or one combination of the layer's channels.

    ``weights(target, num_channels)`` is either a channel index ``()`` (an integer: that
    channel is selected) or channel weights ``(C,)`` (``act @ weights``); ``reduce(projected)
    -> scalar`` reduces the projected activation ``(T', H', W')``. Then ``objective(act,
    target) == reduce(projected)``, and a model can compute that one channel or combination
    instead of all ``C`` (:meth:`kv3d_jax.models.VideoModel.projected_features`). Selecting
    rather than weighting by a one-hot vector keeps another channel's non-finite values out.
    """

    weights: Callable[[jax.Array, int], jax.Array]
    reduce: Callable[[jax.Array], jax.Array]


def _index(target: jax.Array, num_channels: int) -> jax.Array:
    return jnp.asarray(target, jnp.int32)


def _centre(projected: jax.Array) -> jax.Array:
    t, h, w = projected.shape
    return projected[t // 2, h // 2, w // 2]


PROJECTIONS: dict[str, Projection] = {
    "channel": Projection(_index, jnp.mean),
    "neuron": Projection(_index, _centre),
    "weighted": Projection(lambda target, num_channels: target, jnp.mean),
}


def projection(name: str, rectify: bool = False) -> Projection | None:
    """The objective ``name`` as a :class:`Projection`, or None where no single projection
    determines it: a rectified weighted sum needs every channel, since the ReLU acts before the sum."""
    get(name)
    if not rectify:
        return PROJECTIONS[name]
    if name == "weighted":
        return None
    weights, reduce = PROJECTIONS[name]
    return Projection(weights, lambda projected: reduce(jax.nn.relu(projected)))
