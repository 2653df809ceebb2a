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
from kv3d_jax.untrusted import escape, quote

# Where training frameworks put the weights: Lightning, PySlowFast, plain wrappers, Caffe2.
CONTAINER_KEYS = ("state_dict", "model_state", "model", "blobs")
# nn.DataParallel and DistributedDataParallel prefix every name with this.
_WRAPPER_PREFIX = "module."


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's tensors are not the ones the model's converter expects."""


class NonFiniteWeightsError(CheckpointError):
    """Tensors the model would use hold NaN or infinite values."""


class InvalidWeightsError(CheckpointError):
    """Weights a model would use are not real floats, or hold values the model cannot use
    (non-finite in float32, a negative BatchNorm variance)."""


# The dtype a model's weights are used in; a value is finite only if it is finite after the cast to it.
WEIGHTS_DTYPE = np.float32
# Names listed per kind of problem in one error line.
_LISTED = 8


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
    keys = ", ".join(quote(k, 40) for k, _ in zip(checkpoint, range(12))) + (", ..." if len(checkpoint) > 12 else "")
    raise CheckpointError(
        f"the checkpoint is a dict with keys {keys or '(none)'}, but neither a dict of tensors "
        f"nor a wrapper holding one under {', '.join(map(repr, CONTAINER_KEYS))}"
    )


def matched_state_dict(
    checkpoint: Any, expected: Mapping[str, tuple[int, ...]], model: str
) -> dict[str, np.ndarray]:
    """The state dict in ``checkpoint`` if its names and shapes are exactly ``expected`` and its values finite.

    Raises :class:`CheckpointMismatchError` naming the missing, unexpected and misshaped
    tensors (the first few of each), else :class:`NonFiniteWeightsError` naming every tensor
    that holds a NaN or an infinity once cast to float32, the dtype the model uses (a model
    computed from them would be NaN wherever they reach).
    """
    state = find_state_dict(checkpoint)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [k for k in expected if k in state and state[k].shape != tuple(expected[k])]
    if missing or unexpected or misshaped:
        raise CheckpointMismatchError(_mismatch_message(state, expected, model, missing, unexpected, misshaped))
    non_finite = [f"{escape(k, 100)} ({_count_non_finite(state[k])})" for k in expected if not _all_finite(state[k])]
    if non_finite:
        listed = "; ".join(non_finite[:10]) + (f"; and {len(non_finite) - 10} more" if len(non_finite) > 10 else "")
        raise NonFiniteWeightsError(
            f"{len(non_finite)} tensor{'s' if len(non_finite) > 1 else ''} of {model} hold non-finite "
            f"values: {listed}; kv3d converts finite weights only (is the checkpoint from a diverged run?)")
    return state


def _as_used(array: np.ndarray) -> np.ndarray:
    """``array`` cast to :data:`WEIGHTS_DTYPE` (a float64 beyond float32's range becomes inf, silently)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(array, WEIGHTS_DTYPE)


def _all_finite(array: np.ndarray) -> bool:
    return not np.issubdtype(array.dtype, np.floating) or bool(np.isfinite(_as_used(array)).all())


def _count_non_finite(array: np.ndarray) -> str:
    used = _as_used(array)
    nan, inf = int(np.isnan(used).sum()), int(np.isinf(used).sum())
    big = "" if not inf or array.dtype.itemsize <= 4 else " in float32"
    return ", ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "inf" + big)) if n)


def check_weights(params, model: str) -> None:
    """Raises :class:`InvalidWeightsError` unless every leaf of ``params`` (a Flax variables pytree)
    is a real floating-point array whose values are finite after the cast to float32, and every
    BatchNorm variance (``batch_stats/.../var``) is >= 0; the error names each tensor (the first
    few) and what is wrong with it. Whatever door weights come in by — a converted checkpoint, a
    params file, Python — they pass this before a model uses them.
    """
    problems = []
    for path, leaf in _leaves(params):
        name = "/".join(path)
        dtype = getattr(leaf, "dtype", None)
        if not (isinstance(dtype, np.dtype) and (np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16")):
            what = f"{dtype}" if isinstance(dtype, np.dtype) else f"a {type(leaf).__name__}"
            problems.append(f"{name} is {escape(what, 40)}, not real floating-point values")
            continue
        array = np.asarray(leaf)
        if not np.isfinite(_as_used(array)).all():
            problems.append(f"{name} holds {_count_non_finite(array)}")
        elif path[:1] == ("batch_stats",) and path[-1:] == ("var",) and array.size and float(array.min()) < 0:
            problems.append(f"{name} is a BatchNorm variance with {int((array < 0).sum())} negative values "
                            f"(as low as {float(array.min()):.3g})")
    if problems:
        listed = "; ".join(problems[:_LISTED]) + (f"; and {len(problems) - _LISTED} more" if len(problems) > _LISTED else "")
        raise InvalidWeightsError(f"{len(problems)} tensor{'s' if len(problems) > 1 else ''} of {model} cannot be "
                                  f"used: {listed}; kv3d uses finite float32 weights and variances >= 0")


def _leaves(tree, path: tuple = ()):
    """``(path of names, leaf)`` for every leaf of nested dicts ``tree``, names escaped."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _leaves(value, path + (escape(str(key), 80) if isinstance(key, str) else quote(key, 40),))
    else:
        yield path, tree


def _names(names, describe) -> str:
    shown = "; ".join(describe(k) for k in names[:_LISTED])
    return shown + (f"; and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def _mismatch_message(state, expected, model, missing, unexpected, misshaped) -> str:
    counts = [f"{len(names)} {what}" for names, what in
              ((missing, "missing"), (unexpected, "unexpected"), (misshaped, "with the wrong shape"))
              if names]
    lines = [f"the checkpoint does not match {model}; tensors: {', '.join(counts)}"]
    if missing:
        lines.append("  missing: " + _names(missing, lambda k: f"{k} {tuple(expected[k])}"))
    if unexpected:
        lines.append("  unexpected: " + _names(unexpected, lambda k: f"{escape(k, 100)} {state[k].shape}"))
    if misshaped:
        lines.append("  wrong shape: " + _names(
            misshaped, lambda k: f"{k} expected {tuple(expected[k])}, found {state[k].shape}"))
    if missing or unexpected:
        first = next(iter(expected))
        lines.append(f"Is this a checkpoint of another architecture? {model} expects names like {first!r}.")
    else:
        lines.append(f"Is this a variant of {model} (another number of classes or channels)?")
    return "\n".join(lines)
