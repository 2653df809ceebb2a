"""PyTorch state-dict names and shapes of a Flax zoo model, and the conversion between them.

The zoo models name each Flax submodule after its PyTorch module path with ``.`` replaced
by ``_``. Given the model's variables (shapes only) and the inverse of that renaming, this
derives the exact PyTorch table ``{tensor name: shape}`` a checkpoint must hold, and turns
a matching state dict into Flax variables:

- ``Conv3d``: ``weight`` ``(out, in, kT, kH, kW)`` -> ``kernel`` ``(kT, kH, kW, in, out)``, ``bias``;
- ``Linear``: ``weight`` ``(out, in)`` -> ``kernel`` ``(in, out)``, ``bias``;
- ``BatchNorm3d``: ``weight``, ``bias`` -> ``scale``, ``bias``; ``running_mean``,
  ``running_var`` -> ``batch_stats`` ``mean``, ``var``. Its ``num_batches_tracked``
  counter is optional (PyTorch < 0.4.1 did not save it) and unused in eval mode.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from converters.common import find_state_dict, matched_state_dict

_Entry = tuple[str, str, str, str]  # torch name, collection, flax module, flax leaf


def _entries(template: Mapping, torch_path: Callable[[str], str]) -> Iterator[tuple[_Entry, tuple[int, ...]]]:
    for name, leaves in template["params"].items():
        module = torch_path(name)
        if module.replace(".", "_") != name:
            raise AssertionError(f"torch path {module!r} does not rename to Flax module {name!r}")
        if "scale" in leaves:
            c = tuple(leaves["scale"].shape)
            yield (f"{module}.weight", "params", name, "scale"), c
            yield (f"{module}.bias", "params", name, "bias"), c
            yield (f"{module}.running_mean", "batch_stats", name, "mean"), c
            yield (f"{module}.running_var", "batch_stats", name, "var"), c
            continue
        kernel = tuple(leaves["kernel"].shape)
        torch_shape = kernel[::-1] if len(kernel) == 2 else kernel[4:] + kernel[3:4] + kernel[:3]
        yield (f"{module}.weight", "params", name, "kernel"), torch_shape
        if "bias" in leaves:
            yield (f"{module}.bias", "params", name, "bias"), (kernel[-1],)


def expected_shapes(template: Mapping, torch_path: Callable[[str], str]) -> dict[str, tuple[int, ...]]:
    """``{PyTorch tensor name: shape}`` of the model whose variables (or their shapes) are ``template``."""
    return {entry[0]: shape for entry, shape in _entries(template, torch_path)}


def _to_flax(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        array = array.T if array.ndim == 2 else array.transpose(2, 3, 4, 1, 0)
    return np.ascontiguousarray(array, np.float32)


def convert_state(checkpoint: Any, template: Mapping, torch_path: Callable[[str], str], model: str,
                  unused: Mapping[str, tuple[int, ...]] = {}) -> dict:
    """Flax variables ``{"params": ..., "batch_stats": ...}`` (float32 numpy) from ``checkpoint``.

    Args:
      checkpoint: what ``read_checkpoint`` returned, or a flat ``{name: array}`` dict.
      template: the model's variables or their shapes (``jax.eval_shape`` of ``init``).
      torch_path: Flax module name -> PyTorch module path.
      model: the model's name, for errors.
      unused: tensors the checkpoint must also hold, with their shapes, that the trunk does
        not use (a classifier head); they are checked and dropped.

    Raises:
      CheckpointMismatchError: naming every missing, unexpected and misshaped tensor.
    """
    entries = dict(_entries(template, torch_path))
    bn_modules = {torch_path(name) for (_, _, name, leaf) in entries if leaf == "scale"}
    state = {k: v for k, v in find_state_dict(checkpoint).items()
             if not (k.endswith(".num_batches_tracked") and k.rsplit(".", 1)[0] in bn_modules)}
    expected = {entry[0]: shape for entry, shape in entries.items()} | dict(unused)
    state = matched_state_dict(state, expected, model)
    variables: dict = {}
    for (torch_name, collection, name, leaf) in entries:
        variables.setdefault(collection, {}).setdefault(name, {})[leaf] = _to_flax(leaf, state[torch_name])
    return variables


def template_of(init: Callable[[jax.Array], Any]) -> Any:
    """The shapes of the variables ``init(key)`` would make, without computing them."""
    return jax.eval_shape(init, jax.random.key(0))
