"""torchvision's R3D-18, MC3-18, R(2+1)D-18 and S3D ``.pth`` state dicts to :mod:`kv3d_jax.models.torchvision_video` params.

The state dict must be exactly torchvision's for the model (``stem.0.weight`` ...
``layer4.1.conv2.1.running_var``; S3D ``features.0.0.0.weight`` ...), including the
400-class Kinetics classifier (``fc`` / ``classifier.1``), which is checked and dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from converters.torch_layout import convert_state, template_of
from kv3d_jax.models import torchvision_video

# torchvision's Kinetics-400 classifiers: VideoResNet's fc, S3D's 1x1x1 conv classifier.
_RESNET_HEAD = {"fc.weight": (400, 512), "fc.bias": (400,)}
_S3D_HEAD = {"classifier.1.weight": (400, 1024, 1, 1, 1), "classifier.1.bias": (400,)}


def torch_path(name: str) -> str:
    """Flax module name -> torchvision module path: torchvision's path segments hold no ``_``."""
    return name.replace("_", ".")


@dataclasses.dataclass(frozen=True)
class Converter:
    """A converter as :mod:`kv3d_jax.models` names it: what it reads, and ``convert``."""

    CHECKPOINT: str
    convert: Callable[[Any], dict]


def _converter(name: str) -> Converter:
    head = _S3D_HEAD if name == "s3d" else _RESNET_HEAD

    def convert(checkpoint: Any) -> dict:
        template = template_of(lambda key: torchvision_video.init_params(name, key))
        return convert_state(checkpoint, template, torch_path, name, head)

    convert.__doc__ = f"Flax variables of torchvision's {name} from its state dict."
    return Converter(f"torchvision {name} weights: torch.save of the state dict (.pth)", convert)


# One per model, as kv3d_jax.models registers them ("converters.torchvision_video:R3D_18").
R3D_18 = _converter("r3d_18")
MC3_18 = _converter("mc3_18")
R2PLUS1D_18 = _converter("r2plus1d_18")
S3D = _converter("s3d")
