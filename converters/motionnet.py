"""MotionNet: ``scripts/train_motionnet.py``'s state dict to the params of :mod:`kv3d_jax.models.motionnet`.

The checkpoint must hold exactly ``conv1`` … ``conv4`` and ``fc`` with MotionNet's
shapes. Convolution weights go from PyTorch's ``(out, in, depth, height, width)`` to
Flax's ``(depth, height, width, in, out)``, the linear read-out from ``(out, in)`` to
``(in, out)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from converters.common import matched_state_dict
from kv3d_jax.models.motionnet import CHANNELS, CONV_LAYERS, NUM_DIRECTIONS

CHECKPOINT = "torch.save of MotionNet's state dict conv1.weight ... fc.bias (kv3d_jax/assets/motionnet.pt)"

_IN_CHANNELS = (3,) + CHANNELS[:-1]
EXPECTED_SHAPES = {
    **{
        f"{name}.{kind}": shape
        for name, c_in, c_out in zip(CONV_LAYERS, _IN_CHANNELS, CHANNELS)
        for kind, shape in (("weight", (c_out, c_in, 3, 3, 3)), ("bias", (c_out,)))
    },
    "fc.weight": (NUM_DIRECTIONS, CHANNELS[-1]),
    "fc.bias": (NUM_DIRECTIONS,),
}


def convert(checkpoint: Any) -> dict:
    """Flax variables ``{"params": {conv: {"kernel": (3, 3, 3, in, out), "bias"}, "fc": {"kernel": (64, 8), "bias"}}}``.

    All arrays float32.
    """
    state = matched_state_dict(checkpoint, EXPECTED_SHAPES, "motionnet")
    params = {
        name: {
            "kernel": np.ascontiguousarray(state[f"{name}.weight"].transpose(2, 3, 4, 1, 0), np.float32),
            "bias": np.asarray(state[f"{name}.bias"], np.float32),
        }
        for name in CONV_LAYERS
    }
    params["fc"] = {
        "kernel": np.ascontiguousarray(state["fc.weight"].T, np.float32),
        "bias": np.asarray(state["fc.bias"], np.float32),
    }
    return {"params": params}
