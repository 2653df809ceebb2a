"""What kv3d_jax needs to know about a video model: a pure feature function and its layers."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kv3d_jax.untrusted import quote

Params = Any  # Flax variables: {"params": {...}} plus e.g. {"batch_stats": {...}}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UnknownLayerError(ValueError):
    """Raised when a layer name is not one of the model's tappable layers."""


@dataclasses.dataclass(frozen=True)
class VideoModel:
    """A 3D CNN as the optimisers see it.

    Attributes:
      name: registry name, e.g. ``"c3d"``.
      apply: ``apply(params, video, upto) -> activation``; ``video`` is
        ``(N, T, H, W, 3)`` float32, already normalised the model's way, and the
        result is the output of layer ``upto`` as a PyTorch forward hook on that
        module would see it, channels-last ``(N, T', H', W', C)``. Nothing past
        ``upto`` is computed.
      layers: the tappable layer names, in forward order (PyTorch module path
        with ``.`` replaced by ``_``).
      input_shape: the model's native clip size ``(T, H, W)``.
      mean, std: the model's native per-channel input normalisation (RGB).
      linear_layers: layers whose activation is an affine function of the
        model input (so a channel-mean objective has a flat-colour optimum).
      apply_projected: optional ``apply_projected(params, video, upto, weights) ->
        (N, T', H', W')``, the activation of ``upto`` at channel index ``weights`` ``()``
        or projected onto channel weights ``(C,)``, computing one channel's worth of that
        layer instead of ``C``.
      config: the hyper-parameters the model was built with, as ``(name, value)`` pairs
        (empty for a model with one architecture); ``dict(config)`` rebuilds it with
        :func:`kv3d_jax.models.get`.
      channel_names: ``(layer, names of its channels)`` pairs for layers whose channels have
        names (a classifier's classes); channels may be chosen by them and galleries show them.
      min_input_shape: ``(layer, (T, H, W))`` pairs for layers that need a larger clip than
        ``input_shape`` (a classifier head's pooling window); every other layer takes any size.
    """

    name: str
    apply: Callable[[Params, jax.Array, str], jax.Array]
    layers: tuple[str, ...]
    input_shape: tuple[int, int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    linear_layers: frozenset[str] = frozenset()
    apply_projected: Callable[[Params, jax.Array, str, jax.Array], jax.Array] | None = None
    config: tuple[tuple[str, Any], ...] = ()
    channel_names: tuple[tuple[str, tuple[str, ...]], ...] = ()
    min_input_shape: tuple[tuple[str, tuple[int, int, int]], ...] = ()

    def check_layer(self, layer: str) -> str:
        """Returns ``layer`` if the model has it, else raises naming the valid ones."""
        if layer not in self.layers:
            raise UnknownLayerError(
                f"{self.name} has no layer {quote(layer)}; valid layers are: "
                + ", ".join(self.layers)
            )
        return layer

    def features(self, params: Params, video: jax.Array, upto: str) -> jax.Array:
        """Activation of layer ``upto`` for ``video`` ``(N, T, H, W, 3)``: ``(N, T', H', W', C)``."""
        return self.apply(params, video, self.check_layer(upto))

    def projected_features(self, params: Params, video: jax.Array, upto: str, weights: jax.Array) -> jax.Array:
        """Channel ``weights`` of ``features(params, video, upto)`` if it is an integer index
        ``()``, else ``features(...) @ weights`` for channel weights ``(C,)``: ``(N, T', H', W')``.

        Objectives that read one channel, or one fixed combination of channels, need only
        this; models with ``apply_projected`` then compute a single output channel of ``upto``.
        A selected channel is computed from its own weights only (:func:`own_weights`), so a
        non-finite weight of another channel of ``upto`` reaches neither it nor its gradient.
        """
        if self.apply_projected is not None:
            return self.apply_projected(params, video, self.check_layer(upto), weights)
        if jnp.issubdtype(jnp.result_type(weights), jnp.integer):
            return jnp.take(self.features(own_weights(params, upto, weights), video, upto), weights, axis=-1)
        return self.features(params, video, upto) @ weights

    def names_of(self, layer: str) -> tuple[str, ...]:
        """The names of ``layer``'s channels (``channel_names``), or ``()`` if they have none."""
        return dict(self.channel_names).get(layer, ())

    def output_shape(self, params: Params, layer: str, input_shape=None) -> tuple[int, ...]:
        """Shape ``(T', H', W', C)`` of ``layer``'s activation for one clip of ``input_shape`` (default:
        the model's, enlarged to ``layer``'s ``min_input_shape``), without computing it."""
        least = dict(self.min_input_shape).get(layer, (0, 0, 0))
        t, h, w = input_shape or tuple(max(n, m) for n, m in zip(self.input_shape, least))
        video = jax.ShapeDtypeStruct((1, t, h, w, 3), jnp.float32)
        out = jax.eval_shape(lambda p, v: self.features(p, v, layer), params, video)
        return tuple(out.shape[1:])

    def layer_channels(self, params: Params) -> dict[str, int]:
        """Number of channels of every layer, without computing them: in one trace where ``apply``
        takes a sequence of layers (the models built on ``run_until``), else layer by layer."""
        least = [shape for _, shape in self.min_input_shape]
        t, h, w = (max(sizes) for sizes in zip(self.input_shape, *least))
        video = jax.ShapeDtypeStruct((1, t, h, w, 3), jnp.float32)
        try:
            out = jax.eval_shape(lambda p, v: self.apply(p, v, self.layers), params, video)
        except ValueError:  # an apply that reads one layer per call
            return {layer: self.num_channels(params, layer) for layer in self.layers}
        return {layer: out[layer].shape[-1] for layer in self.layers}

    def num_channels(self, params: Params, layer: str) -> int:
        """Number of channels (kernels) of ``layer``."""
        return self.output_shape(params, layer)[-1]


def _layer_weights(params: Params, layer: str):
    """The entry ``params["params"][layer]`` of a Flax convolution (it holds a ``kernel``), or None."""
    layer_params = params.get("params", {}).get(layer) if hasattr(params, "get") else None
    return layer_params if hasattr(layer_params, "items") and "kernel" in layer_params else None


def _keep_channels(params: Params, layer: str, keep: jax.Array) -> Params:
    """``params`` with the output channels of ``layer`` where ``keep`` ``(C,)`` is False set to zero in
    every leaf of the layer whose last axis is its ``C`` output channels (``where``, not a product, so
    that a non-finite weight is replaced, not multiplied)."""
    layer_params = params["params"][layer]

    def zero_others(leaf):
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[-1] != keep.shape[0]:
            return leaf
        return jnp.where(keep, leaf, jnp.zeros((), jnp.result_type(leaf)))

    masked = {name: zero_others(leaf) for name, leaf in layer_params.items()}
    return {**params, "params": {**params["params"], layer: masked}}


def own_weights(params: Params, layer: str, channel: jax.Array) -> Params:
    """``params`` with the weights of every output channel of ``layer`` but ``channel`` set to zero.

    The layer's weights are the leaves under ``params["params"][layer]`` whose last axis is its
    output channels (a Flax convolution's ``kernel`` and ``bias``); ``params`` is returned
    unchanged when it holds no such entry. Zeroing (``where``, not a product) keeps a non-finite
    weight of another channel out of both the channel's activation and its gradient, which
    flows back through every output channel's weights.
    """
    layer_params = _layer_weights(params, layer)
    if layer_params is None:
        return params
    return _keep_channels(params, layer, jnp.arange(jnp.shape(layer_params["kernel"])[-1]) == channel)


def finite_channels(params: Params, layer: str) -> tuple[Params, jax.Array | None]:
    """``(params, finite)``: ``params`` with every output channel of ``layer`` that holds a non-finite
    weight set to zero, and ``finite`` ``(C,)`` bool, the channels left as they were.

    For what reads all of ``layer``'s channels at once (a diversity pattern): one channel's NaN
    weights would otherwise reach every value and, through the backward pass over the layer's
    weights, every gradient. The weights are those of :func:`own_weights`; ``(params, None)``
    when ``params`` holds no such entry.
    """
    layer_params = _layer_weights(params, layer)
    if layer_params is None:
        return params, None
    channels = jnp.shape(layer_params["kernel"])[-1]
    finite = jnp.ones((channels,), bool)
    for leaf in jax.tree.leaves(layer_params):
        if jnp.ndim(leaf) and jnp.shape(leaf)[-1] == channels:
            finite &= jnp.all(jnp.isfinite(leaf), axis=tuple(range(jnp.ndim(leaf) - 1)))
    return _keep_channels(params, layer, finite), finite
