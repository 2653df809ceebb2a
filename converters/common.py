"""What every converter needs: find the state dict in a checkpoint and check it strictly.

A converter states the exact ``{tensor name: shape}`` table of the checkpoint it reads;
:func:`matched_state_dict` returns the flat state dict if it matches the table and
otherwise raises one :class:`CheckpointMismatchError` listing every missing, unexpected
and misshaped tensor, so a wrong file fails once, completely, and before any conversion.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from converters.checkpoint import CheckpointError

# Where training frameworks put the weights: Lightning, PySlowFast, plain wrappers, Caffe2.
CONTAINER_KEYS = ("state_dict", "model_state", "model", "blobs")
# nn.DataParallel and DistributedDataParallel prefix every name with this.
_WRAPPER_PREFIX = "module."


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's tensors are not the ones the model's converter expects."""


class NonFiniteWeightsError(CheckpointError):
    """Tensors the model would use hold NaN or infinite values."""


def find_state_dict(checkpoint: Any) -> dict[str, np.ndarray]:
    """The flat ``{name: array}`` state dict in ``checkpoint`` (an object from ``read_checkpoint``).

    Accepts the state dict itself or a dict holding it under one of
    :data:`CONTAINER_KEYS` (nested wrappers too), and drops a ``module.`` prefix that
    every name shares.
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"the checkpoint holds a {type(checkpoint).__name__}, not a dict of tensors"
        )
    if checkpoint and all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in checkpoint.items()
    ):
        if all(k.startswith(_WRAPPER_PREFIX) for k in checkpoint):
            return {k[len(_WRAPPER_PREFIX):]: v for k, v in checkpoint.items()}
        return dict(checkpoint)
    for key in CONTAINER_KEYS:
        if isinstance(checkpoint.get(key), dict):
            return find_state_dict(checkpoint[key])
    keys = ", ".join(repr(k) for k in list(checkpoint)[:12]) + (", ..." if len(checkpoint) > 12 else "")
    raise CheckpointError(
        f"the checkpoint is a dict with keys {keys or '(none)'}, but neither a dict of tensors "
        f"nor a wrapper holding one under {', '.join(map(repr, CONTAINER_KEYS))}"
    )


def matched_state_dict(
    checkpoint: Any, expected: Mapping[str, tuple[int, ...]], model: str
) -> dict[str, np.ndarray]:
    """The state dict in ``checkpoint`` if its names and shapes are exactly ``expected`` and its values finite.

    Raises :class:`CheckpointMismatchError` naming every missing, unexpected and
    misshaped tensor, else :class:`NonFiniteWeightsError` naming every tensor that holds
    a NaN or an infinity (a model computed from them would be NaN wherever they reach).
    """
    state = find_state_dict(checkpoint)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [k for k in expected if k in state and state[k].shape != tuple(expected[k])]
    if missing or unexpected or misshaped:
        raise CheckpointMismatchError(_mismatch_message(state, expected, model, missing, unexpected, misshaped))
    non_finite = [f"{k} ({_count_non_finite(state[k])})" for k in expected if not _all_finite(state[k])]
    if non_finite:
        listed = "; ".join(non_finite[:10]) + (f"; and {len(non_finite) - 10} more" if len(non_finite) > 10 else "")
        raise NonFiniteWeightsError(
            f"{len(non_finite)} tensor{'s' if len(non_finite) > 1 else ''} of {model} hold non-finite "
            f"values: {listed}; kv3d converts finite weights only (is the checkpoint from a diverged run?)")
    return state


def _all_finite(array: np.ndarray) -> bool:
    return not np.issubdtype(array.dtype, np.floating) or bool(np.isfinite(array).all())


def _count_non_finite(array: np.ndarray) -> str:
    nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
    return ", ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "inf")) if n)


def _mismatch_message(state, expected, model, missing, unexpected, misshaped) -> str:
    counts = [f"{len(names)} {what}" for names, what in
              ((missing, "missing"), (unexpected, "unexpected"), (misshaped, "with the wrong shape"))
              if names]
    lines = [f"the checkpoint does not match {model}; tensors: {', '.join(counts)}"]
    if missing:
        lines.append("  missing: " + "; ".join(f"{k} {tuple(expected[k])}" for k in missing))
    if unexpected:
        lines.append("  unexpected: " + "; ".join(f"{k} {state[k].shape}" for k in unexpected))
    if misshaped:
        lines.append("  wrong shape: " + "; ".join(
            f"{k} expected {tuple(expected[k])}, found {state[k].shape}" for k in misshaped))
    if missing or unexpected:
        first = next(iter(expected))
        lines.append(f"Is this a checkpoint of another architecture? {model} expects names like {first!r}.")
    else:
        lines.append(f"Is this a variant of {model} (another number of classes or channels)?")
    return "\n".join(lines)
