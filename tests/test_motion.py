"""The motion read-out: sign and angle conventions, observability weighting, the dominant motion of
the reconstruction, temporal aliasing, how much motion explains, reliability, PSNR."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kv3d_jax import reliability
from kv3d_jax.decomposition import Decomposition
from kv3d_jax.motion import (direction_deg, explained, motion_summary, observability, psnr, translation, velocity,
                              wavevector)
from kv3d_jax.stimuli import drifting_grating, translating_texture, velocity_from_direction
from kv3d_jax.tuning import angular_difference
from kv3d_jax.warp import warp_batch


def _rigid(velocities, t=6, h=24, w=24, seed=0) -> Decomposition:
    """A hand-made decomposition per velocity: a textured static and ``D_t = -t v``."""
    statics, displacements = [], []
    for k, v in enumerate(velocities):
        statics.append(translating_texture(np.random.default_rng(seed + k), 1, h, w, (0.0, 0.0))[0])
        displacements.append(-np.arange(t)[:, None, None, None] * np.broadcast_to(np.float32(v), (h, w, 2)))
    return _decomposition(np.stack(statics), np.stack(displacements))


def _decomposition(statics, displacements) -> Decomposition:
    """A decomposition of ``statics`` ``(K, H, W, 3)`` and ``displacements`` ``(K, T, H, W, 2)``: its
    reconstruction is the statics warped by the displacements, as stage 2 builds it."""
    statics = jnp.asarray(statics, jnp.float32)
    displacements = jnp.asarray(displacements, jnp.float32)
    k = len(statics)
    recon = warp_batch(statics, displacements)
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
    # Bilinear resampling of the static blurs each frame a little differently: the
    # translation of the reconstruction is then exact only to within a few hundredths.
    assert (angular_difference(np.asarray(summary.direction_deg), directions) < 1.0).all(), summary.direction_deg
    # SPEC §4's circular mean of the velocity field reads the same rigid motion exactly.
    np.testing.assert_allclose(np.asarray(summary.field_direction_deg), directions, atol=1e-3)
    np.testing.assert_allclose(np.asarray(summary.speed), speeds, rtol=0.03)
    np.testing.assert_allclose(np.asarray(summary.translation),
                               [velocity_from_direction(d, s) for d, s in zip(directions, speeds)], atol=0.03)
    np.testing.assert_array_equal(np.asarray(summary.psnr), 33.0)
    assert not np.asarray(summary.aliased).any()
    assert (np.asarray(summary.explained) > 0.9).all() and np.asarray(summary.reliable).all()
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


def test_flat_static_falls_back_to_uniform_weights_and_has_no_direction():
    dec = _rigid([(0.0, -1.0)])
    dec = _decomposition(np.full_like(dec.static, 0.5), dec.displacement)
    summary = motion_summary(dec)
    # Nothing in a flat video moves: no direction, no speed, nothing explained, not reliable.
    assert np.isnan(float(summary.direction_deg[0])) and float(summary.speed[0]) == 0.0
    assert float(summary.explained[0]) == 0.0 and not bool(summary.reliable[0])
    w = np.asarray(summary.weight[0])
    assert np.allclose(w[w > 0], w[w > 0].max())


def _grating_statics(period: float, size: int = 32, k: int = 1) -> np.ndarray:
    """``k`` statics of vertical stripes ``period`` px apart (a grating moving right, frame 0)."""
    return np.repeat(np.asarray(drifting_grating(1, size, size, 0.0, 1.0 / period, 0.0))[:1], k, axis=0)


def test_the_dominant_motion_is_the_videos_not_an_alias_of_the_decomposition():
    # Stripes 6 px apart moving right by 1 px/frame. A decomposition may explain the same
    # frames by moving them 5 px/frame left (one period back): its velocity field says so,
    # the reconstruction does not.
    t, size, period = 6, 32, 6.0
    statics = _grating_statics(period, size)
    true = -np.arange(t)[:, None, None, None] * np.broadcast_to(np.float32([1.0, 0.0]), (size, size, 2))
    alias = -np.arange(t)[:, None, None, None] * np.broadcast_to(np.float32([1.0 - period, 0.0]), (size, size, 2))
    truth = _decomposition(statics, true[None])
    # Where no sample point is clamped at the border, the alias gives the same frames.
    np.testing.assert_allclose(np.asarray(_decomposition(statics, alias[None]).reconstruction)[0, :3, :, 2:21],
                               np.asarray(truth.reconstruction)[0, :3, :, 2:21], atol=1e-4)
    aliased = truth.replace(displacement=jnp.asarray(alias[None]))
    for dec, is_alias in ((truth, False), (aliased, True)):
        summary = motion_summary(dec)
        assert angular_difference(float(summary.direction_deg[0]), 0.0) < 1.0
        # The spectrum of a 32-px static resolves frequencies to 1/32 cycles/px: 6.4 px here.
        np.testing.assert_allclose(float(summary.period[0]), 32 / round(32 / period), rtol=1e-5)
        assert bool(summary.aliased[0]) == is_alias
        if is_alias:
            # Its speed cannot be told from the alias's: reported as ambiguous, not as a number.
            assert np.isnan(float(summary.speed[0]))
            assert angular_difference(float(summary.field_direction_deg[0]), 180.0) < 1e-3
        else:
            np.testing.assert_allclose(float(summary.speed[0]), 1.0, rtol=0.02)


def test_a_drifting_grating_reads_its_normal_velocity():
    # The aperture problem: a grating's frames say only how fast its stripes cross, so the
    # dominant motion is the smallest one that carries them, across the stripes. Oblique stripes
    # 20, 8 and 5 px apart drifting through the frame, new stripes entering at its edges.
    cases = [(d, freq, speed) for d in np.arange(15.0, 360.0, 30.0)
             for freq, speed in ((0.05, 2.0), (0.125, 1.0), (0.2, 0.5))]
    videos = jnp.stack([drifting_grating(8, 40, 40, d, freq, freq * speed) for d, freq, speed in cases])
    v = np.asarray(jax.jit(jax.vmap(translation))(videos))
    truth = np.array([d for d, _, _ in cases])
    assert angular_difference(np.asarray(direction_deg(v[:, 0], v[:, 1])), truth).max() < 1.5, v
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), [speed for _, _, speed in cases], rtol=0.05)


def test_motion_close_to_half_a_period_per_frame_is_ambiguous():
    t, size, period, speed = 8, 32, 4.0, 1.8  # 0.45 cycles/frame: near the Nyquist limit
    statics = _grating_statics(period, size)
    displacement = -np.arange(t)[:, None, None, None] * np.broadcast_to(np.float32([speed, 0.0]), (size, size, 2))
    summary = motion_summary(_decomposition(statics, displacement[None]))
    assert bool(summary.aliased[0]) and np.isnan(float(summary.speed[0]))
    assert float(summary.reliability[0]) < reliability.RELIABLE or not bool(summary.reliable[0])


def test_wavevector_is_the_peak_spatial_frequency():
    stripes = np.asarray(drifting_grating(1, 32, 32, 90.0, 0.25, 0.0))[0]  # horizontal stripes, 4 px apart
    np.testing.assert_allclose(np.abs(np.asarray(wavevector(jnp.asarray(stripes)))), [0.0, 0.25], atol=1e-6)


def test_flicker_is_not_explained_by_motion():
    rng = np.random.default_rng(0)
    flicker = jnp.asarray(rng.uniform(size=(6, 24, 24, 3)), jnp.float32)
    assert float(explained(flicker, jnp.zeros(2))) < 0.05
    moving = translating_texture(rng, 6, 24, 24, (1.0, 0.0))
    assert float(explained(jnp.asarray(moving), jnp.array([1.0, 0.0]))) > 0.8


def test_reliability_marks_a_kernel_no_better_than_random_videos_dead():
    dec = _rigid([(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)])
    random = jnp.asarray(np.random.default_rng(0).normal(1.0, 0.1, size=(3, 8)), jnp.float32)
    # Kernel 0 beats random videos by far; kernel 1 not at all; kernel 2 never activates.
    objective, peak = jnp.array([5.0, 1.05, 4.0]), jnp.array([3.0, 2.0, -0.5])
    summary = motion_summary(dec, objective=objective, baseline=random, peak=peak)
    dead = np.asarray(reliability.dead(peak, reliability.gain(objective, random)))
    np.testing.assert_array_equal(dead, [False, True, True])
    np.testing.assert_array_equal(np.asarray(summary.reliable), [True, False, False])
    np.testing.assert_array_equal(np.asarray(summary.reliability)[1:], 0.0)
    assert 0.5 < float(summary.reliability[0]) <= 1.0


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
