"""A kernel that turns non-finite fails alone: in every stage, in its record, and `visualize` finishes the rest."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kv3d_jax import pipeline, zoo
from kv3d_jax.job import Job
from kv3d_jax.record import KernelRecord

JOB = Job(model="motionnet", preset="native", steps=3, decompose_steps=4, seed=2, refine_steps=2, media="gif")


def _spoiled(params, layer: str, channel: int):
    """``params`` with a NaN in one weight of ``layer``'s output ``channel``."""
    kernel = params["params"][layer]["kernel"]
    broken = jax.tree.map(lambda leaf: leaf, params)
    broken["params"][layer]["kernel"] = jnp.asarray(kernel).at[1, 1, 1, 0, channel].set(jnp.nan)
    return broken


@pytest.mark.slow
@pytest.mark.parametrize("layer, channels, bad", [("conv1", [0, 1, 2], 1), ("conv3", [4, 5, 6, 7], 6)])
def test_nan_weights_of_one_channel_change_no_other_channel(layer, channels, bad):
    model, params = zoo.load("motionnet")
    clean = pipeline.compute_chunk(model, params, layer, channels, JOB)
    spoiled = pipeline.compute_chunk(model, _spoiled(params, layer, bad), layer, channels, JOB)
    for channel in channels:
        if channel == bad:
            assert spoiled[channel]["failed"] == 1  # stage 1 is where it failed first
            continue
        assert spoiled[channel]["failed"] == 0 and clean[channel]["failed"] == 0
        for name, value in clean[channel].items():
            # Every stage: stage 1's video, stage 2's static and displacement, stage 3's refined_*.
            np.testing.assert_array_equal(spoiled[channel][name], value, err_msg=f"{layer}:{channel} {name}")
    assert set(clean[channels[0]]) == set(KernelRecord((16, 32, 32), refined=True).arrays())


@pytest.mark.slow
def test_visualize_finishes_the_other_kernels(tmp_path):
    model, params = zoo.load("motionnet")
    job = Job(model="motionnet", preset="native", steps=2, decompose_steps=2, seed=0, batch=3, media="gif")
    pipeline.visualize(model, _spoiled(params, "conv1", 3), job, ["conv1"], "2-4", tmp_path, log=[].append)
    failed = {c: float(np.load(tmp_path / "kernels" / "conv1" / f"{c}.npz")["failed"]) for c in (2, 3, 4)}
    assert failed == {2: 0.0, 3: 1.0, 4: 0.0}
    assert (tmp_path / "conv1" / "motionnet_conv1_3_static.png").is_file()
    assert (tmp_path / "index.html").is_file()
