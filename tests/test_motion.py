"""The motion read-out: sign and angle conventions, observability weighting, PSNR."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kv3d_jax.decomposition import Decomposition
from kv3d_jax.motion import direction_deg, motion_summary, observability, psnr, velocity
from kv3d_jax.stimuli import translating_texture, velocity_from_direction


def _rigid(velocities, t=6, h=24, w=24, seed=0) -> Decomposition:
    """A hand-made decomposition per velocity: a textured static and ``D_t = -t v``."""
    statics, displacements = [], []
    for k, v in enumerate(velocities):
        statics.append(translating_texture(np.random.default_rng(seed + k), 1, h, w, (0.0, 0.0))[0])
        displacements.append(-np.arange(t)[:, None, None, None] * np.broadcast_to(np.float32(v), (h, w, 2)))
    statics = jnp.asarray(np.stack(statics))
    displacements = jnp.asarray(np.stack(displacements), jnp.float32)
    k = len(velocities)
    recon = jnp.zeros((k, t, h, w, 3))
    return Decomposition(statics, displacements, recon, {}, jnp.full((k,), 33.0), np.zeros(k, bool))


def test_velocity_is_minus_the_change_of_displacement():
    d = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 3, 4, 2)), jnp.float32)
    u = velocity(d)
    assert u.shape == (2, 4, 3, 4, 2)
    np.testing.assert_allclose(np.asarray(u[:, 1]), -np.asarray(d[:, 2] - d[:, 1]), atol=1e-6)


def test_direction_convention_is_screen_angle():
    vx = jnp.array([1.0, 0.0, -1.0, 0.0, 1.0])
    vy = jnp.array([0.0, -1.0, 0.0, 1.0, 1.0])  # vy is downwards
    np.testing.assert_allclose(np.asarray(direction_deg(vx, vy)), [0.0, 90.0, 180.0, 270.0, 315.0], atol=1e-4)


def test_summary_recovers_rigid_motion_and_agrees_with_stimuli():
    directions, speeds = [0.0, 90.0, 200.0], [0.5, 1.0, 2.0]
    dec = _rigid([velocity_from_direction(d, s) for d, s in zip(directions, speeds)])
    summary = motion_summary(dec)
    np.testing.assert_allclose(np.asarray(summary.direction_deg), directions, atol=1e-3)
    np.testing.assert_allclose(np.asarray(summary.speed), speeds, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(summary.psnr), 33.0)
    assert summary.velocity.shape == (3, 5, 24, 24, 2) and summary.weight.shape == (3, 5, 24, 24)


def test_pixels_sampling_outside_and_the_border_band_are_ignored():
    dec = _rigid([(1.0, 0.0)], t=4)
    # Corrupt what a read-out must not trust: content that "entered" through the left
    # edge (sample points pushed outside, with a wild velocity) ...
    d = np.array(dec.displacement)
    d[0, 2:, :, :3] = [-40.0, 30.0]
    dec = dec.replace(displacement=jnp.asarray(d))
    weight = np.asarray(jax.jit(observability, static_argnums=(2, 3))(dec.static[0], dec.displacement[0], 2, 0.0))
    assert (weight[1:, :, :3] == 0).all() and (weight[:, :2] == 0).all() and (weight[:, -2:] == 0).all()
    summary = motion_summary(dec)
    np.testing.assert_allclose(float(summary.direction_deg[0]), 0.0, atol=1e-3)
    np.testing.assert_allclose(float(summary.speed[0]), 1.0, rtol=1e-5)


def test_flat_static_falls_back_to_uniform_weights():
    dec = _rigid([(0.0, -1.0)])
    dec = dec.replace(static=jnp.full_like(dec.static, 0.5))
    summary = motion_summary(dec)
    assert np.isfinite(np.asarray(summary.speed)).all()
    np.testing.assert_allclose(float(summary.direction_deg[0]), 90.0, atol=1e-3)
    w = np.asarray(summary.weight[0])
    assert np.allclose(w[w > 0], w[w > 0].max())


def test_psnr_against_given_videos():
    videos = jnp.zeros((2, 3, 4, 4, 3))
    recon = videos.at[0].add(0.1).at[1].add(0.01)
    np.testing.assert_allclose(np.asarray(psnr(recon, videos)), [20.0, 40.0], rtol=1e-5)
    where = jnp.zeros((2, 3, 4, 4), bool).at[0, 0].set(True)
    np.testing.assert_allclose(np.asarray(psnr(recon.at[0, 1:].add(0.5), videos, where)), [20.0, 120.0], rtol=1e-5)
    dec = _rigid([(1.0, 0.0), (0.0, 1.0)], t=3, h=4, w=4).replace(reconstruction=recon)
    np.testing.assert_allclose(np.asarray(motion_summary(dec, videos).psnr), [20.0, 40.0], rtol=1e-5)


@pytest.mark.parametrize("border, margin, side", [(0, 0.0, 16), (5, 0.0, 6), (0, 2.0, 12), (3, 2.0, 10)])
def test_border_band_and_margin(border, margin, side):
    dec = _rigid([(0.5, 0.5)], t=2, h=16, w=16)
    still = jnp.zeros_like(dec.displacement[0])
    weight = np.asarray(jax.jit(observability, static_argnums=(2, 3))(dec.static[0], still, border, margin))
    assert ((weight > 0).sum(axis=(1, 2)) == side**2).all()
