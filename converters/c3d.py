"""C3D: ``c3d-pytorch``'s state dict (``c3d.pickle``) to the params of :mod:`kv3d_jax.models.c3d`.

The checkpoint must hold exactly ``conv1`` … ``conv5b`` and ``fc6`` … ``fc8`` (487
Sports-1M classes) with c3d-pytorch's shapes. Convolution weights go from PyTorch's
``(out, in, depth, height, width)`` to Flax's ``(depth, height, width, in, out)``.

``fc6`` … ``fc8`` are checked (a C3D fine-tuned to other classes fails here, saying so)
and then dropped: kv3d visualises convolution channels, and the trunk ends at ``conv5b``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from converters.common import matched_state_dict
from kv3d_jax.models.c3d import CONV_CHANNELS, CONV_LAYERS

CHECKPOINT = "c3d-pytorch's c3d.pickle: torch.save of a state dict conv1.weight ... fc8.bias"

_IN_CHANNELS = dict(zip(CONV_LAYERS, (3,) + tuple(CONV_CHANNELS[n] for n in CONV_LAYERS[:-1])))
EXPECTED_SHAPES = {
    **{
        f"{name}.{kind}": shape
        for name in CONV_LAYERS
        for kind, shape in (
            ("weight", (CONV_CHANNELS[name], _IN_CHANNELS[name], 3, 3, 3)),
            ("bias", (CONV_CHANNELS[name],)),
        )
    },
    "fc6.weight": (4096, 8192), "fc6.bias": (4096,),
    "fc7.weight": (4096, 4096), "fc7.bias": (4096,),
    "fc8.weight": (487, 4096), "fc8.bias": (487,),
}


def convert(checkpoint: Any) -> dict:
    """Flax variables ``{"params": {conv: {"kernel": (3, 3, 3, in, out), "bias": (out,)}}}``, float32."""
    state = matched_state_dict(checkpoint, EXPECTED_SHAPES, "c3d")
    return {
        "params": {
            name: {
                "kernel": np.ascontiguousarray(state[f"{name}.weight"].transpose(2, 3, 4, 1, 0), np.float32),
                "bias": np.asarray(state[f"{name}.bias"], np.float32),
            }
            for name in CONV_LAYERS
        }
    }
