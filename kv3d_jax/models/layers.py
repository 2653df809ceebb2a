"""Flax building blocks with PyTorch semantics, and the tap protocol the zoo models share.

A zoo model's forward pass is written as a generator of ``(layer name, activation)``
pairs, one per tappable module, in the order PyTorch runs them. :func:`run_until`
consumes it and stops at the requested layer, so nothing past that layer is computed.
Submodules are created while the generator runs inside the model's ``@nn.compact``
``__call__``, so Flax names them by the ``name=`` given here: the PyTorch module path
with ``.`` replaced by ``_``.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import flax.linen as nn
import jax

Taps = Iterator[tuple[str, jax.Array]]


def run_until(taps: Taps, upto: str | Sequence[str], valid: Sequence[str]):
    """Runs ``taps`` up to layer ``upto``.

    Args:
      taps: the model's forward generator.
      upto: one layer name, or several.
      valid: the model's tappable layers, for the error message.

    Returns:
      The activation of ``upto`` if it is a string; else a dict from each requested
      name to its activation, computed in one pass that stops at the last of them.
    """
    wanted = {upto} if isinstance(upto, str) else set(upto)
    found = {}
    for name, x in taps:
        if name in wanted:
            found[name] = x
            if len(found) == len(wanted):
                return found[upto] if isinstance(upto, str) else found
    missing = sorted(wanted - set(found))
    raise ValueError(f"no layer named {', '.join(map(repr, missing))}; valid layers are: {', '.join(valid)}")


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    return (v,) * 3 if isinstance(v, int) else tuple(v)


def conv3d(name: str, features: int, kernel: int | Sequence[int], stride: int | Sequence[int] = 1,
           padding: int | Sequence[int] = 0, bias: bool = False, groups: int = 1) -> nn.Conv:
    """A ``torch.nn.Conv3d`` as a Flax ``Conv`` on NTHWC: symmetric zero padding of ``padding`` per axis."""
    return nn.Conv(features, _triple(kernel), strides=_triple(stride),
                   padding=tuple((p, p) for p in _triple(padding)),
                   use_bias=bias, feature_group_count=groups, name=name)


def same_pad_conv3d(name: str, features: int, kernel: int, stride: int | Sequence[int] = 1,
                    bias: bool = True) -> nn.Conv:
    """VideoGPT's ``SamePadConv3d``: total padding ``k - s`` per axis, the odd pixel in front."""
    pads = tuple((k - s) // 2 + (k - s) % 2 for k, s in zip(_triple(kernel), _triple(stride)))
    after = tuple((k - s) // 2 for k, s in zip(_triple(kernel), _triple(stride)))
    return nn.Conv(features, _triple(kernel), strides=_triple(stride),
                   padding=tuple(zip(pads, after)), use_bias=bias, name=name)


def batch_norm(name: str, eps: float = 1e-5) -> nn.BatchNorm:
    """``torch.nn.BatchNorm3d`` in eval mode: running statistics from the ``batch_stats`` collection."""
    return nn.BatchNorm(use_running_average=True, epsilon=eps, name=name)


def max_pool3d(x: jax.Array, window: int | Sequence[int], stride: int | Sequence[int],
               padding: int | Sequence[int] = 0) -> jax.Array:
    """``torch.nn.MaxPool3d`` (floor mode) on NTHWC; padded cells never win (they are -inf)."""
    return nn.max_pool(x, _triple(window), strides=_triple(stride),
                       padding=tuple((p, p) for p in _triple(padding)))
