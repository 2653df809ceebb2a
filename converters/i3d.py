"""I3D-R50 8x8: PySlowFast's Caffe2 ``I3D_8x8_R50.pkl`` or a ``.pyth`` to :mod:`kv3d_jax.models.i3d` params.

Two files carry these weights:

- the Caffe2 pickle ``{'blobs': {name: ndarray}}`` of PySlowFast's model zoo, with names
  like ``conv1_w``, ``res_conv1_bn_s``, ``res2_0_branch2a_w``, ``res2_0_branch1_bn_riv``,
  ``pred_w``. They are renamed to PyTorch names with the regular expressions of
  PySlowFast's ``slowfast/utils/c2_model_loading.py`` (the subset that applies to a
  single-pathway ResNet without non-local blocks), applied in order. Caffe2's training
  state — ``model_iter``, ``lr`` and a ``<blob>_momentum`` per trained blob — is dropped,
  as PySlowFast's loader does;
- a PySlowFast ``torch.save`` checkpoint with the state dict under ``model_state``
  (``s1.pathway0_stem.conv.weight`` ...);
- PyTorchVideo's hub checkpoint ``I3D_8x8_R50.pyth`` (what
  ``pytorchvideo.models.hub.i3d_r50(pretrained=True)`` downloads; ``model_state`` with
  ``blocks.N...`` names of ``pytorchvideo.models.resnet.create_resnet``). It is the same
  network — stem ``5x7x7``, the same temporal kernels per block, the ``2x1x1`` pool after
  ``res2`` — so its tensors are renamed to PySlowFast's (:func:`pytorchvideo_name_to_pytorch`)
  and the model keeps PySlowFast's layer names whichever file it came from:
  ``blocks.0`` is ``s1.pathway0_stem``, ``blocks.1/3/4/5.res_blocks.i`` are
  ``s2/s3/s4/s5.pathway0_res<i>`` (``blocks.2`` is the pool, ``blocks.6.proj`` the head).

Whichever file, the tensors must be exactly those of the I3D_8x8_R50 config, including the
400-class ``head.projection`` (checked, then dropped).
"""

from __future__ import annotations

import re
from typing import Any

from converters.common import CheckpointMismatchError, find_state_dict
from converters.torch_layout import convert_state, template_of
from kv3d_jax.models import i3d
from kv3d_jax.untrusted import quote

CHECKPOINT = ("I3D_8x8_R50: PySlowFast's Caffe2 pickle {'blobs': ...} (I3D_8x8_R50.pkl) or .pyth "
              "with 'model_state', or PyTorchVideo's hub I3D_8x8_R50.pyth ('model_state', blocks.N...)")

HEAD_SHAPES = {"head.projection.weight": (400, 2048), "head.projection.bias": (400,)}

# From PySlowFast c2_model_loading.get_name_convert_func(), in its order; the non-local,
# fast-pathway ("t_") and fusion rules match no blob of a single-pathway I3D and are left out.
_CAFFE2_TO_PYTORCH = tuple((re.compile(a), b) for a, b in (
    (r"^res([0-9]+)_([0-9]+)_branch([0-9]+)([a-z])_(.*)", r"s\1.pathway0_res\2.branch\3.\4_\5"),
    (r"^res_conv1_bn_(.*)", r"s1.pathway0_stem.bn.\1"),
    (r"^conv1_(.*)", r"s1.pathway0_stem.conv.\1"),
    (r"^res([0-9]+)_([0-9]+)_branch([0-9]+)_(.*)", r"s\1.pathway0_res\2.branch\3_\4"),
    (r"^res_conv1_(.*)", r"s1.pathway0_stem.conv.\1"),
    (r"pred_(.*)", r"head.projection.\1"),
    (r"(.*)bn.b\Z", r"\1bn.bias"),
    (r"(.*)bn.s\Z", r"\1bn.weight"),
    (r"(.*)bn.rm\Z", r"\1bn.running_mean"),
    (r"(.*)bn.riv\Z", r"\1bn.running_var"),
    (r"(.*)[\._]b\Z", r"\1.bias"),
    (r"(.*)[\._]w\Z", r"\1.weight"),
))
# Caffe2 training state in the pickle: not weights.
_CAFFE2_TRAINING_BLOBS = ("model_iter", "lr")
_MAX_BLOB_NAME = 200


def caffe2_name_to_pytorch(name: str) -> str:
    """PySlowFast's renaming of a Caffe2 blob: ``res2_0_branch2a_bn_s`` -> ``s2.pathway0_res0.branch2.a_bn.weight``."""
    for pattern, replacement in _CAFFE2_TO_PYTORCH:
        name = pattern.sub(replacement, name)
    return name


def caffe2_state_dict(blobs: dict) -> dict:
    """The PyTorch-named state dict in a Caffe2 ``blobs`` dict, without Caffe2's training state."""
    # PySlowFast's renaming rules are regular expressions that cost time quadratic in a name's length.
    named = [k for k in blobs if not (isinstance(k, str) and len(k) <= _MAX_BLOB_NAME)]
    if named:
        raise CheckpointMismatchError(f"Caffe2 blob names are strings of at most {_MAX_BLOB_NAME} characters; "
                                      f"the checkpoint has a blob named {quote(named[0])}: not an I3D checkpoint")
    weights = {k: v for k, v in blobs.items()
               if k not in _CAFFE2_TRAINING_BLOBS
               and not (k.endswith("_momentum") and k[: -len("_momentum")] in blobs)}
    state = {caffe2_name_to_pytorch(k): v for k, v in weights.items()}
    if len(state) != len(weights):
        raise CheckpointMismatchError("two Caffe2 blobs map to the same PyTorch name; not an I3D checkpoint")
    return state


# PyTorchVideo ResBlock / BottleneckBlock submodules -> PySlowFast's.
_PYTORCHVIDEO_BLOCK_PARTS = {
    "branch1_conv": "branch1", "branch1_norm": "branch1_bn",
    **{f"branch2.conv_{x}": f"branch2.{x}" for x in "abc"},
    **{f"branch2.norm_{x}": f"branch2.{x}_bn" for x in "abc"},
}
_PYTORCHVIDEO_STAGES = {"1": "s2", "3": "s3", "4": "s4", "5": "s5"}  # blocks.2 is the pool after res2
_PYTORCHVIDEO_NAME = re.compile(
    r"blocks\.0\.(?P<stem>conv|norm)\.(?P<stem_leaf>\w+)"
    r"|blocks\.(?P<stage>[1345])\.res_blocks\.(?P<block>\d+)\.(?P<part>branch1_conv|branch1_norm"
    r"|branch2\.conv_[abc]|branch2\.norm_[abc])\.(?P<leaf>\w+)"
    r"|blocks\.6\.proj\.(?P<head_leaf>weight|bias)")


def pytorchvideo_name_to_pytorch(name: str) -> str:
    """PyTorchVideo's hub I3D-R50 tensor name as PySlowFast's
    (``blocks.1.res_blocks.0.branch2.norm_a.weight`` -> ``s2.pathway0_res0.branch2.a_bn.weight``);
    a name of neither stays as it is."""
    m = _PYTORCHVIDEO_NAME.fullmatch(name)
    if m is None:
        return name
    if m["stem"]:
        return f"s1.pathway0_stem.{'conv' if m['stem'] == 'conv' else 'bn'}.{m['stem_leaf']}"
    if m["stage"]:
        part = _PYTORCHVIDEO_BLOCK_PARTS[m["part"]]
        return f"{_PYTORCHVIDEO_STAGES[m['stage']]}.pathway0_res{m['block']}.{part}.{m['leaf']}"
    return f"head.projection.{m['head_leaf']}"


def pytorchvideo_state_dict(state: dict) -> dict:
    """A PyTorchVideo ``blocks.N...`` state dict with PySlowFast's names."""
    renamed = {pytorchvideo_name_to_pytorch(k): v for k, v in state.items()}
    if len(renamed) != len(state):
        raise CheckpointMismatchError("two PyTorchVideo tensors map to the same PySlowFast name; "
                                      "not an I3D checkpoint")
    return renamed


def torch_path(name: str) -> str:
    """Flax module name -> PySlowFast module path (``s2_pathway0_res0_branch2_a_bn`` -> ``s2.pathway0_res0.branch2.a_bn``)."""
    m = re.fullmatch(r"(s\d)_(pathway0_stem|pathway0_res\d+)(?:_(.+))?", name)
    if m is None:
        raise AssertionError(f"{name!r} is not an I3D module name")
    stage, unit, rest = m.groups()
    if rest is None:
        return f"{stage}.{unit}"
    return ".".join((stage, unit, re.sub(r"^branch2_([a-c])", r"branch2.\1", rest)))


def convert(checkpoint: Any) -> dict:
    """Flax variables of :class:`kv3d_jax.models.i3d.I3D` from a Caffe2, PySlowFast or PyTorchVideo checkpoint."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("blobs"), dict):
        checkpoint = caffe2_state_dict(checkpoint["blobs"])
    else:
        state = find_state_dict(checkpoint)
        if any(k.startswith("blocks.") for k in state):
            checkpoint = pytorchvideo_state_dict(state)
    return convert_state(checkpoint, template_of(i3d.init_params), torch_path, "i3d_r50", HEAD_SHAPES)
