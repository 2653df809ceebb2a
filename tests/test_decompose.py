"""Stage 2: the SPEC objective against PyTorch, known motion recovered (batch and chunk
independence: test_independence)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kv3d_jax import decompose, motion_summary
from kv3d_jax.decomposition import Config, initial_displacement, normalise, objective
from kv3d_jax.decomposition import psnr
from kv3d_jax.stimuli import translating_texture, velocity_from_direction
from kv3d_jax.warp import inside, warp_batch



def _torch_objective(static, displacement, video, lambda_d, lambda_i, lambda_0):
    """Independent SPEC §3 loss: grid_sample(border, align_corners=True) and the reference's TV."""
    t, h, w, _ = displacement.shape
    img = torch.tensor(static).permute(2, 0, 1)[None].expand(t, -1, -1, -1)
    d = torch.tensor(displacement)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    grid = torch.stack([(xs + d[..., 0]) * 2 / (w - 1) - 1, (ys + d[..., 1]) * 2 / (h - 1) - 1], dim=-1)
    recon = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True).permute(0, 2, 3, 1)
    v = torch.tensor(video)
    s = torch.tensor(static)
    tv_d = sum((d.diff(dim=a).abs().mean() for a in range(3)), torch.tensor(0.0))
    tv_i = sum((s.diff(dim=a).abs().mean() for a in range(2)), torch.tensor(0.0))
    loss = F.mse_loss(recon, v) + lambda_d * tv_d + lambda_i * tv_i + lambda_0 * F.mse_loss(s, v[0])
    return float(loss)


def test_objective_matches_pytorch():
    rng = np.random.default_rng(0)
    static = rng.random((12, 15, 3), dtype=np.float32) - 0.5
    video = rng.random((5, 12, 15, 3), dtype=np.float32) - 0.5
    displacement = (rng.standard_normal((5, 12, 15, 2)) * 2).astype(np.float32)
    config = Config(lambda_d=0.3, lambda_i=0.2, lambda_0=0.7)
    total, terms = jax.jit(objective, static_argnums=3)(static, displacement, video, config)
    expected = _torch_objective(static, displacement, video, 0.3, 0.2, 0.7)
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    assert set(terms) == {"total", "reconstruction", "tv_displacement", "tv_static", "anchor"}


def _ground_truth_set():
    """8 directions at 0.5-2 px/frame plus a still video, 16x64x64 smooth random textures."""
    directions = np.arange(8) * 45.0 + 10.0
    speeds = np.array([0.5, 2.0, 1.0, 1.5, 0.75, 1.25, 1.75, 2.0])
    videos = [
        translating_texture(np.random.default_rng(k), 16, 64, 64, velocity_from_direction(d, s))
        for k, (d, s) in enumerate(zip(directions, speeds))
    ]
    videos.append(translating_texture(np.random.default_rng(99), 16, 64, 64, (0.0, 0.0)))
    return np.stack(videos), directions, speeds


def _errors(summary, directions, speeds):
    """Direction errors (deg) and relative speed errors of the moving videos of a summary."""
    got_dir, got_speed = np.asarray(summary.direction_deg), np.asarray(summary.speed)
    moving = len(directions)
    direction_error = np.abs((got_dir[:moving] - directions + 180.0) % 360.0 - 180.0)
    return direction_error, np.abs(got_speed[:moving] / speeds - 1.0)


@pytest.mark.slow
def test_ground_truth_motion_is_recovered():
    # SPEC §5 at its own size: 16x64x64 textures translating 0.5-2 px/frame in 8 directions, and
    # a still one. The motion is the initialisation's and is settled within 100 steps (measured:
    # worst direction error 0.12 deg, speed 1.3 %, the same as at 400 and 2000 steps);
    # test_default_decomposition_explains_the_fastest_videos checks the default 2000 steps.
    videos, directions, speeds = _ground_truth_set()
    result = decompose(videos, config=Config(steps=100))
    summary = motion_summary(result, videos)
    direction_error, speed_error = _errors(summary, directions, speeds)
    assert np.median(direction_error) <= 5.0, direction_error
    assert direction_error.max() <= 15.0, direction_error
    assert speed_error.max() <= 0.10, summary.speed
    assert np.asarray(summary.speed)[8] < 0.05, summary.speed
    # What a static of the frame's size can explain at all (the pixels whose content was in
    # view at frame 0) is explained to 30 dB already (49-70 dB measured).
    explained = np.asarray(psnr(result.reconstruction, videos, where=inside(result.displacement)))
    assert explained.min() >= 30.0, explained


@pytest.mark.slow
def test_default_decomposition_explains_the_fastest_videos():
    # The README's claim at the default 2000 steps: each video explained to 30 dB PSNR. Content
    # that enters through the border during the clip (up to 30 px at 2 px/frame) is in no H×W
    # static image, so the fastest videos are the hardest: the exact decomposition (frame 0 moved
    # at the true velocity) reaches only 20-25 dB at 1-2 px/frame, and the decomposition's PSNR
    # falls with speed (measured after 100 and after 400 steps: the two 2 px/frame videos lowest,
    # 26.9-30.0 dB; every slower one higher). Those two, at the defaults, with the motion checks
    # again; the videos are independent problems (test_independence), and each costs 2000 steps
    # (about 40 s on 2 cores), so the slower ones and the still one are left to
    # test_ground_truth_motion_is_recovered.
    videos, directions, speeds = _ground_truth_set()
    chosen = [1, 7]
    videos, directions, speeds = videos[chosen], directions[chosen], speeds[chosen]
    result = decompose(videos)
    summary = motion_summary(result, videos)
    direction_error, speed_error = _errors(summary, directions, speeds)
    assert direction_error.max() <= 5.0, direction_error
    assert speed_error.max() <= 0.10, summary.speed
    whole = np.asarray(summary.psnr)
    explained = np.asarray(psnr(result.reconstruction, videos, where=inside(result.displacement)))
    true_velocity = np.array([velocity_from_direction(d, s) for d, s in zip(directions, speeds)])
    true_displacement = -np.arange(16)[None, :, None, None, None] * true_velocity[:, None, None, None, :]
    exact = warp_batch(jnp.asarray(videos[:, 0]), jnp.broadcast_to(true_displacement, (2, 16, 64, 64, 2)))
    exact_psnr = np.asarray(psnr(exact, videos))
    assert whole.min() >= 30.0, whole
    assert explained.min() >= 30.0, explained
    assert (whole >= exact_psnr + 3.0).all(), (whole, exact_psnr)


def test_initial_displacement_follows_a_translation():
    v = velocity_from_direction(30.0, 1.5)
    video = translating_texture(np.random.default_rng(5), 4, 32, 32, v)
    normalised, _, _ = normalise(jnp.asarray(video))
    d = np.asarray(jax.jit(initial_displacement)(normalised))
    # D_t = -t v wherever the content was already in view at frame 0.
    np.testing.assert_allclose(np.median(d[3, 4:24, 8:28], axis=(0, 1)), -3 * np.array(v), atol=0.1)
    np.testing.assert_array_equal(d[0], 0.0)


def _pair():
    a = translating_texture(np.random.default_rng(1), 6, 24, 20, (1.0, 0.5))
    b = translating_texture(np.random.default_rng(2), 6, 24, 20, (-0.5, 1.0)) * 0.5 + 0.2
    return np.stack([a, b])


@pytest.mark.slow
def test_progress_is_reported_after_each_chunk():
    # That the chunks key every step alike: test_independence.test_every_step_is_keyed_by_its_number_in_any_chunks.
    videos = _pair()
    calls = []
    decompose(videos, config=Config(steps=5, chunk=2), callback=lambda *call: calls.append(call))
    assert [call[:2] for call in calls] == [(2, 5), (4, 5), (5, 5)]
    # The metric is the mean loss of the batch's last step: positive, and falling.
    assert all(call[2] > 0 for call in calls) and calls[-1][2] < calls[0][2]


def test_result_is_in_the_input_units():
    videos = _pair()
    start = decompose(videos, config=Config(steps=0))
    np.testing.assert_allclose(np.asarray(start.static), videos[:, 0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(start.reconstruction[:, 0]), videos[:, 0], atol=1e-5)
    assert start.displacement.shape == (2, 6, 24, 20, 2)
    assert set(start.terms) == {"total", "reconstruction", "tv_displacement", "tv_static", "anchor"}
    assert start.terms["total"].shape == (2,)


def test_normalise_round_trip_and_constant_video():
    video = jnp.linspace(0.2, 0.6, 2 * 3 * 3 * 3).reshape(2, 3, 3, 3)
    normalised, lo, scale = normalise(video)
    assert float(normalised.min()) == pytest.approx(-0.5) and float(normalised.max()) == pytest.approx(0.5)
    np.testing.assert_allclose(np.asarray((normalised + 0.5) * scale + lo), np.asarray(video), atol=1e-6)
    flat, _, _ = normalise(jnp.full((2, 3, 3, 3), 0.4))
    np.testing.assert_array_equal(np.asarray(flat), -0.5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"videos": np.zeros((6, 8, 8, 3), np.float32)}, "videos \\(K, T, H, W, 3\\)"),
        ({"videos": np.zeros((1, 1, 8, 8, 3), np.float32)}, "at least 2 frames"),
        ({"videos": np.zeros((1, 4, 8, 8, 3), np.uint8)}, "divide uint8 by 255"),
        ({"videos": np.zeros((0, 4, 8, 8, 3), np.float32)}, "no videos"),
        ({"config": {"steps": 3}}, "config must be a kv3d_jax.decomposition.Config"),
        ({"config": Config(chunk=0)}, "chunk must be at least 1"),
        ({"config": Config(steps=-1)}, "steps must be at least 0"),
        ({"key": jax.random.split(jax.random.key(0), 3)}, "keys of shape \\(3,\\) for 2 kernels"),
        ({"key": jax.random.key(0), "ids": [1]}, "1 ids for 2 videos"),
    ],
)
def test_bad_input_names_the_problem(kwargs, message):
    kwargs = {"videos": np.zeros((2, 4, 8, 8, 3), np.float32), "config": Config(steps=0), **kwargs}
    with pytest.raises(ValueError, match=message):
        decompose(kwargs.pop("videos"), **kwargs)


def test_a_non_finite_video_fails_alone():
    videos = _pair()
    broken = videos.copy()
    broken[0, 2, 5, 7, 1] = np.nan
    config = Config(steps=5, chunk=2)  # test_progress_is_reported_after_each_chunk's programs
    clean, spoiled = decompose(videos, config=config), decompose(broken, config=config)
    np.testing.assert_array_equal(clean.failed, [False, False])
    np.testing.assert_array_equal(spoiled.failed, [True, False])
    for name in ("static", "displacement", "reconstruction", "psnr"):
        np.testing.assert_array_equal(np.asarray(getattr(spoiled, name))[1], np.asarray(getattr(clean, name))[1])
