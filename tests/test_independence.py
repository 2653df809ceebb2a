"""A kernel's result depends on its key and its target only: not on the kernels that share its
batch, and not on how many steps each compiled chunk runs beyond rounding (every step is keyed by
its number; programs unrolled over different numbers of steps round differently, README "How it
is built"). One parameterised test per property, over every stage that optimises (the runner's
three users); the batch check is shown to fail when the key derivation follows the batch position
instead of the kernel's id."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kv3d_jax import runner
from kv3d_jax.decomposition import Config as DecomposeConfig
from kv3d_jax.decomposition import Decomposition, decompose
from kv3d_jax.maximization import PRESETS, maximize
from kv3d_jax.refinement import Config as RefineConfig
from kv3d_jax.refinement import refine
from kv3d_jax.stimuli import translating_texture
from kv3d_jax.warp import warp_batch

from tiny_model import tiny

SHAPE = (6, 16, 16)
# Jitter on: stage 1 and stage 3 draw a transform from every step's key.
PRESET = dataclasses.replace(PRESETS["native"], shape=SHAPE, max_shift=(2, 2, 2))


TINY, TINY_PARAMS = tiny(SHAPE)
CHANNELS = [2, 5]


def _videos() -> np.ndarray:
    """Two different translating textures ``(2, 6, 16, 16, 3)``: one per kernel of :data:`CHANNELS`."""
    a = translating_texture(np.random.default_rng(1), *SHAPE, (1.0, 0.5))
    b = translating_texture(np.random.default_rng(2), *SHAPE, (-0.5, 1.0)) * 0.5 + 0.2
    return np.stack([a, b]).astype(np.float32)


def _start() -> Decomposition:
    """:func:`_videos` as a decomposition (frame 0 moved at a constant velocity): refine's start."""
    videos = jnp.asarray(_videos())
    velocity = jnp.asarray([[1.0, 0.5], [-0.5, 1.0]])
    displacement = -jnp.arange(SHAPE[0], dtype=jnp.float32)[None, :, None, None, None] * velocity[:, None, None, None]
    displacement = jnp.broadcast_to(displacement, (2, *SHAPE, 2))
    return Decomposition(videos[:, 0], displacement, warp_batch(videos[:, 0], displacement), {}, jnp.zeros(2),
                         np.zeros(2, bool))


def _maximize(index, steps, chunk, **kw):
    result = maximize(TINY, TINY_PARAMS, "b", [CHANNELS[i] for i in index],
                      config=dataclasses.replace(PRESET, steps=steps, chunk=chunk), **kw)
    return {"video": result.videos, "objective": result.objective}


def _decompose(index, steps, chunk, **kw):
    result = decompose(_videos()[list(index)], [CHANNELS[i] for i in index],
                       config=DecomposeConfig(steps=steps, chunk=chunk), **kw)
    return {"static": result.static, "displacement": result.displacement, "psnr": result.psnr}


def _refine(index, steps, chunk, **kw):
    start = jax.tree.map(lambda leaf: leaf[np.asarray(index)], _start())
    result = refine(TINY, TINY_PARAMS, "b", start, [CHANNELS[i] for i in index],
                    config=RefineConfig(steps=steps, chunk=chunk, preset=PRESET), **kw)
    return {"static": result.static, "displacement": result.displacement, "video": result.video,
            "objective": result.objective}


def _refine_from_noise(index, steps, chunk, **kw):
    result = refine(TINY, TINY_PARAMS, "b", None, [CHANNELS[i] for i in index],
                    config=RefineConfig(steps=steps, chunk=chunk, preset=PRESET), **kw)
    return {"static": result.static, "displacement": result.displacement, "objective": result.objective}


STAGES = {"maximize": _maximize, "decompose": _decompose, "refine": _refine, "refine from noise": _refine_from_noise}


def _stages(names) -> list:
    """``names`` as pytest parameters, all but stage 1's marked slow: the decomposition's and the
    refinement's programs take the longest to compile, and the quick loop keeps each property on
    stage 1, which runs through the same runner."""
    return [name if name == "maximize" else pytest.param(name, marks=pytest.mark.slow) for name in names]


def _assert_same(a: dict, b: dict, what: str) -> None:
    for name in a:
        np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), atol=1e-5, rtol=1e-5,
                                   err_msg=f"{what}: {name}")


# Every run below uses these steps, chunk lengths and batch sizes, so that the stages' programs are
# compiled once for the module (two kernels, and one) and the checks run them again and again.
STEPS, CHUNK = 3, 2  # a chunk of 2 and a shorter last one: each step keyed by its number
KEY = jax.random.key(7)


def _run(stage: str, index, chunk=CHUNK, key=KEY, keys="one", batch_size=None) -> dict:
    """``stage`` for the kernels ``index`` of :data:`CHANNELS`, all in one batch unless
    ``batch_size``; ``keys``: ``"one"`` (``key`` folded with each kernel's id) or ``"per kernel"``
    (``split(key, 2)[index]``)."""
    if keys == "per kernel":
        key = jax.random.split(key, 2)[np.asarray(index)]
    return STAGES[stage](index, STEPS, chunk, key=key, batch_size=batch_size or len(index))


@pytest.fixture(scope="module")
def together() -> dict:
    """Both kernels of every stage in one batch: ``{(stage, keys): outputs}``, built as asked."""
    return {}


def _together(together: dict, stage: str, keys: str) -> dict:
    if (stage, keys) not in together:
        together[stage, keys] = _run(stage, [0, 1], keys=keys)
    return together[stage, keys]


def _check_batch_independence(stage: str, keys: str, both: dict) -> None:
    """``both``, the two kernels run in one batch, equals each kernel run alone."""
    for i in range(2):
        alone = _run(stage, [i], keys=keys)
        _assert_same({name: value[i : i + 1] for name, value in both.items()}, alone, f"kernel {i} alone")


@pytest.mark.parametrize("keys", ["one", pytest.param("per kernel", marks=pytest.mark.slow)])
@pytest.mark.parametrize("stage", _stages(STAGES))
def test_a_kernels_result_does_not_depend_on_its_batch(stage, keys, together):
    both = _together(together, stage, keys)
    _check_batch_independence(stage, keys, both)
    # Both kernels again, in batches of one: the runner's own split of a larger request.
    _assert_same(both, _run(stage, [0, 1], keys=keys, batch_size=1), "batches of one")


# Refine from noise steps as refine does: only its start differs, and the start is not chunked.
@pytest.mark.parametrize("stage", _stages(["maximize", "decompose", "refine"]))
def test_every_step_is_keyed_by_its_number_in_any_chunks(stage, together):
    # Chunks of 2 and 1 against three of 1: equal to 1e-5 at 3 steps, where a step keyed by its
    # place in the chunk would draw another jitter.
    _assert_same(_together(together, stage, "one"), _run(stage, [0, 1], chunk=1), "chunks of 1")


@pytest.mark.parametrize("stage", _stages(STAGES))
def test_the_kernels_key_reaches_its_result(stage):
    # The independence above is not an artefact of keys that nothing reads.
    first, other = _run(stage, [0]), _run(stage, [0], key=jax.random.key(8))
    difference = max(float(np.abs(np.asarray(first[name]) - np.asarray(other[name])).max()) for name in first)
    assert difference > 1e-4, difference


def test_kernel_keys_fold_each_id_into_the_key():
    keys = jax.random.key_data(runner.kernel_keys(KEY, [10, 11, 10]))
    np.testing.assert_array_equal(keys[0], jax.random.key_data(jax.random.fold_in(KEY, 10)))
    np.testing.assert_array_equal(keys[0], keys[2])
    assert not np.array_equal(keys[0], keys[1])
    # The same video decomposed under another id starts from another jitter.
    video = _videos()[:1]
    first, other = (decompose(video, [i], config=DecomposeConfig(steps=STEPS, chunk=CHUNK), key=KEY, batch_size=1)
                    for i in (10, 11))
    assert float(np.abs(np.asarray(first.static) - np.asarray(other.static)).max()) > 1e-4


@pytest.mark.parametrize("stage", _stages(STAGES))
def test_the_batch_check_fails_when_keys_follow_the_batch_position(stage, monkeypatch):
    derive = runner.kernel_keys

    def by_position(key, ids):
        # The bug the runner avoids: kernel k of a batch gets fold_in(key, k), whatever its id.
        return derive(key, np.arange(len(np.asarray(ids).reshape(-1))))

    monkeypatch.setattr(runner, "kernel_keys", by_position)
    with pytest.raises(AssertionError, match="kernel 1 alone"):
        _check_batch_independence(stage, "one", _run(stage, [0, 1]))
