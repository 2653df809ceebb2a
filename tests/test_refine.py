"""Texture-plus-motion optimisation: the warp parameterization against PyTorch, its regularisers,
what it reaches on C3D, and its place in `kv3d visualize` (independence of kernels from their
batch and chunks: test_independence)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kv3d_jax import models, parameterizations, pipeline, writers
from kv3d_jax.job import Job
from kv3d_jax.cli import build_parser
from kv3d_jax import decomposition
from kv3d_jax.decomposition import Decomposition, decompose
from kv3d_jax.maximization import PRESETS, maximize, preset
from kv3d_jax.models import c3d
from kv3d_jax.motion import motion_summary
from kv3d_jax.refinement import (DEFAULT_STEPS, Config, Refinement, from_decomposition, penalty, refine,
                                 used_displacement)
from kv3d_jax.tuning import angular_difference
from kv3d_jax.warp import warp_batch

from tiny_model import tiny

C3D = models.get("c3d")
SMALL = (8, 16, 16)
SMALL_PRESET = dataclasses.replace(PRESETS["native"], shape=SMALL, max_shift=(2, 2, 2))


TINY, TINY_PARAMS = tiny(SMALL)


@pytest.fixture(scope="module")
def c3d_params():
    return jax.jit(c3d.init_params)(jax.random.PRNGKey(0))


def _torch_video(static: np.ndarray, displacement: np.ndarray):
    """Independent reference of ``V_t = warp(sigmoid(static @ C.T), D_t)``: grid_sample (bilinear,
    border, align_corners=True) of the decorrelated static; returns the video and the torch leaves."""
    t, h, w, _ = displacement.shape
    p = torch.tensor(static, requires_grad=True)
    d = torch.tensor(displacement, requires_grad=True)
    image = torch.sigmoid(p @ torch.tensor(parameterizations.COLOR_DECORRELATION).T)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    grid = torch.stack([(xs + d[..., 0]) * 2 / (w - 1) - 1, (ys + d[..., 1]) * 2 / (h - 1) - 1], dim=-1)
    frames = F.grid_sample(image.permute(2, 0, 1)[None].expand(t, -1, -1, -1), grid, mode="bilinear",
                           padding_mode="border", align_corners=True)
    return frames.permute(0, 2, 3, 1), p, d


def _torch_warp(image: np.ndarray, displacement: np.ndarray) -> np.ndarray:
    """``image`` ``(H, W, 3)`` backward-warped by ``displacement`` ``(T, H, W, 2)`` px with grid_sample."""
    t, h, w, _ = displacement.shape
    d = torch.tensor(displacement)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    grid = torch.stack([(xs + d[..., 0]) * 2 / (w - 1) - 1, (ys + d[..., 1]) * 2 / (h - 1) - 1], dim=-1)
    frames = F.grid_sample(torch.tensor(image).permute(2, 0, 1)[None].expand(t, -1, -1, -1), grid, mode="bilinear",
                           padding_mode="border", align_corners=True)
    return frames.permute(0, 2, 3, 1).numpy()


def test_warp_parameterization_and_its_gradients_match_grid_sample():
    rng = np.random.default_rng(0)
    static = rng.standard_normal((11, 13, 3)).astype(np.float32)
    # Spread enough that some sample points fall outside: the border rule is exercised too.
    displacement = (2.5 * rng.standard_normal((5, 11, 13, 2))).astype(np.float32)
    cotangent = rng.standard_normal((5, 11, 13, 3)).astype(np.float32)
    expected, p, d = _torch_video(static, displacement)
    (expected * torch.tensor(cotangent)).sum().backward()

    to_video = parameterizations.get("static_displacement").to_video
    param = {"static": jnp.asarray(static), "displacement": jnp.asarray(displacement)}
    got = jax.jit(to_video)(param)
    grads = jax.jit(jax.grad(lambda q: jnp.sum(to_video(q) * cotangent)))(param)
    np.testing.assert_allclose(np.asarray(got), expected.detach().numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(grads["static"]), p.grad.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(grads["displacement"]), d.grad.numpy(), atol=1e-5, rtol=0)


def _torch_constant_velocity(d):
    """Least-squares fit of each pixel's ``D_t`` by ``a + b t``, solved by ``torch.linalg.lstsq``."""
    t = d.shape[0]
    design = torch.stack([torch.ones(t), torch.arange(t, dtype=torch.float32)], dim=1)
    coef = torch.linalg.lstsq(design, d.reshape(t, -1)).solution
    return (design @ coef).reshape(d.shape)


def test_constant_velocity_parameterization_and_its_gradients_match_grid_sample():
    rng = np.random.default_rng(4)
    static = rng.standard_normal((9, 12, 3)).astype(np.float32)
    displacement = (2.5 * rng.standard_normal((6, 9, 12, 2))).astype(np.float32)
    cotangent = rng.standard_normal((6, 9, 12, 3)).astype(np.float32)
    d = torch.tensor(displacement, requires_grad=True)
    fitted = _torch_constant_velocity(d)
    expected, p, fitted_leaf = _torch_video(static, fitted.detach().numpy())
    (expected * torch.tensor(cotangent)).sum().backward()
    fitted.backward(fitted_leaf.grad)  # the chain rule through the fit, back to D

    to_video = parameterizations.get("static_velocity").to_video
    param = {"static": jnp.asarray(static), "displacement": jnp.asarray(displacement)}
    grads = jax.jit(jax.grad(lambda q: jnp.sum(to_video(q) * cotangent)))(param)
    np.testing.assert_allclose(np.asarray(jax.jit(to_video)(param)), expected.detach().numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(grads["static"]), p.grad.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(grads["displacement"]), d.grad.numpy(), atol=1e-5, rtol=0)
    fit = np.asarray(parameterizations.constant_velocity(jnp.asarray(displacement)))
    np.testing.assert_allclose(fit, fitted.detach().numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(parameterizations.constant_velocity(jnp.asarray(fit))), fit, atol=1e-5)
    # Two frames lie on a line, and one frame has no velocity: both are their own fit.
    for frames in (2, 1):
        np.testing.assert_allclose(np.asarray(parameterizations.constant_velocity(jnp.asarray(displacement[:frames]))),
                                   displacement[:frames], atol=1e-5, rtol=0, err_msg=f"{frames} frames")
    # One velocity per pixel: every frame-to-frame difference is the same.
    np.testing.assert_allclose(np.diff(fit, axis=0), np.broadcast_to(np.diff(fit, axis=0)[:1], (5, 9, 12, 2)),
                               atol=1e-5)


def test_penalty_is_the_weighted_total_variation():
    rng = np.random.default_rng(1)
    param = {"static": jnp.asarray(rng.standard_normal((6, 7, 3)), jnp.float32),
             "displacement": jnp.asarray(rng.standard_normal((4, 6, 7, 2)), jnp.float32)}
    image = torch.sigmoid(torch.tensor(np.asarray(param["static"])) @ torch.tensor(parameterizations.COLOR_DECORRELATION).T)
    d = torch.tensor(np.asarray(param["displacement"]))
    tv = lambda x, axes: sum(x.diff(dim=a).abs().mean() for a in axes)
    for motion, used in (("free", d), ("constant", _torch_constant_velocity(d))):
        expected = 0.3 * tv(used, (0, 1, 2)) + 0.7 * tv(image, (0, 1))
        got = penalty(param, Config(lambda_d=0.3, lambda_i=0.7, motion=motion))
        np.testing.assert_allclose(float(got), float(expected), rtol=1e-5, err_msg=motion)


def _translating(k: int, shape=SMALL) -> Decomposition:
    """K random statics translating 1 px/frame in K evenly spaced directions (0° first), as a decomposition."""
    t, h, w = shape
    rng = np.random.default_rng(k)
    static = jnp.asarray(rng.random((k, h, w, 3)), jnp.float32)
    angles = np.linspace(0.0, 2 * np.pi, k, endpoint=False)
    velocity = np.stack([np.cos(angles), -np.sin(angles)], axis=-1).astype(np.float32)  # px/frame, y down
    # u_t = -(D_{t+1} - D_t): content moving by v means D_t = -t v.
    displacement = -np.arange(t, dtype=np.float32)[None, :, None, None, None] * velocity[:, None, None, None, :]
    displacement = jnp.asarray(np.broadcast_to(displacement, (k, t, h, w, 2)))
    video = warp_batch(static, displacement)
    return Decomposition(static, displacement, video, {}, jnp.zeros((k,)), np.zeros(k, bool))


def test_the_start_reproduces_the_decomposition():
    dec = _translating(3)
    lo, hi = Config().start_range
    video = jax.vmap(parameterizations.static_displacement_to_video)(from_decomposition(dec))
    np.testing.assert_allclose(np.asarray(video), lo + (hi - lo) * np.asarray(dec.reconstruction), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_maco_texture_keeps_the_decompositions_phase_and_takes_the_natural_amplitude():
    dec = _translating(2)
    start = from_decomposition(dec, Config(texture="maco"))
    assert start["static"].shape == (2, 16, 9, 3)
    spectrum = np.fft.rfft2(np.asarray(jax.vmap(parameterizations.maco_texture)(start["static"]), np.float64),
                            axes=(1, 2))
    magnitude = parameterizations.maco_magnitude((1, 16, 16))[0]
    np.testing.assert_allclose(np.abs(spectrum), np.broadcast_to(magnitude, spectrum.shape), rtol=0,
                               atol=1e-5 * magnitude.max())
    # The phase is the decomposition's texture's, except on the four real coefficients (their sign
    # is not a phase a spectrum with even amplitude can keep; the mean is removed).
    pixel = np.fft.rfft2(np.asarray(from_decomposition(dec)["static"], np.float64), axes=(1, 2))
    complex_ = np.ones((16, 9), bool)
    complex_[np.ix_([0, 8], [0, 8])] = False
    np.testing.assert_allclose(np.exp(1j * np.angle(spectrum))[:, complex_], np.exp(1j * np.angle(pixel))[:, complex_],
                               atol=1e-4)
    gradient = jax.grad(lambda q: parameterizations.maco_static_velocity_to_video(q)[:, :4].mean())
    grads = gradient(jax.tree.map(lambda x: x[0], start))
    assert float(jnp.abs(grads["static"]).max()) > 0 and float(jnp.abs(grads["displacement"]).max()) > 0


@pytest.mark.slow
def test_a_maco_texture_refinement_raises_the_objective():
    run = lambda steps: refine(TINY, TINY_PARAMS, "b", _translating(2), [1, 4], batch_size=2,
                               config=Config(texture="maco", steps=steps, preset=SMALL_PRESET, chunk=2))
    assert np.all(np.asarray(run(8).objective) > np.asarray(run(2).objective))


@pytest.mark.slow
def test_regularisers_smooth_the_static_and_the_motion():
    dec = _translating(2)
    # Chunks of 2 steps and one batch asked for: the cheapest programs to compile.
    run = lambda lam: refine(TINY, TINY_PARAMS, "b", dec, [1, 4], batch_size=2,
                             config=Config(lambda_d=lam, lambda_i=lam, steps=20, preset=SMALL_PRESET, chunk=2))
    free, smooth = run(0.0), run(10.0)
    for term in ("tv_displacement", "tv_static"):
        assert np.all(np.asarray(smooth.terms[term]) < 0.9 * np.asarray(free.terms[term])), term
    assert np.all(np.asarray(free.objective) > np.asarray(smooth.objective))


@pytest.mark.slow
def test_refinement_reads_like_a_decomposition(tmp_path):
    dec = _translating(2)
    result = refine(TINY, TINY_PARAMS, "b", dec, [0, 5], config=Config(steps=2, preset=SMALL_PRESET), batch_size=2)
    assert isinstance(result, Refinement) and result.layer == "b"
    assert result.static.shape == (2, 16, 16, 3) and result.displacement.shape == (2, *SMALL, 2)
    np.testing.assert_allclose(np.asarray(result.static).min(axis=(1, 2, 3)), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(result.static).max(axis=(1, 2, 3)), 1.0, atol=1e-6)
    # The video is the static seen through the displacement, by an independent warp (grid_sample).
    for k in range(2):
        np.testing.assert_allclose(np.asarray(result.reconstruction[k]),
                                   _torch_warp(np.asarray(result.static[k]), np.asarray(result.displacement[k])),
                                   atol=1e-5)
    # The default motion: one velocity per pixel, the same in every frame.
    u = np.diff(np.asarray(result.displacement), axis=1)
    np.testing.assert_allclose(u, np.broadcast_to(u[:, :1], u.shape), atol=1e-5)
    summary = motion_summary(result)
    # Two steps barely move a 1 px/frame translation: the read-out still sees it.
    np.testing.assert_allclose(np.asarray(summary.speed), 1.0, atol=0.1)
    assert np.all(angular_difference(np.asarray(summary.direction_deg), [0.0, 180.0]) < 5.0)
    written = writers.save_refinement(tmp_path, "tiny_b_0", result.video[0], result.static[0], result.displacement[0])
    assert sorted(p.name for p in written.values()) == sorted(
        f"tiny_b_0_{kind}.{'png' if kind == 'refined_static' else 'gif'}" for kind in writers.REFINEMENT_FILES)
    assert all(p.stat().st_size > 0 for p in written.values())


@pytest.mark.parametrize("kwargs, message", [
    (dict(channels=[0]), "holds 2 kernels but 1 channels were named"),
    (dict(decomposition="videos"), "needs a decomposition with .static"),
    (dict(decomposition=_translating(2).replace(static=jnp.zeros((2, 16, 14, 3)))), "do not match"),
    (dict(config=Config(preset=preset(SMALL_PRESET, objective="weighted"))), "one channel per kernel"),
    (dict(config=Config(motion="rigid", preset=SMALL_PRESET)), "unknown motion 'rigid'; valid motions are: constant, free"),
    (dict(config=Config(texture="fourier", preset=SMALL_PRESET)), "unknown texture 'fourier'; valid textures are: pixel, maco"),
    (dict(decomposition=_translating(2, (8, 16, 15)), config=Config(texture="maco", preset=SMALL_PRESET)),
     "MACO texture parameterization needs an even width, got W=15"),
    (dict(config=Config(steps=0, preset=SMALL_PRESET)), "steps must be at least 1"),
    (dict(config=Config(preset="fast")), "valid presets are: paper, native"),
    (dict(config=SMALL_PRESET), "config must be a kv3d_jax.refinement.Config"),
    (dict(channels=[0, 6]), "b has channels 0..5; got \\[6\\]"),
    (dict(layer="c"), "valid layers are: a, b"),
])
def test_bad_arguments_are_named(kwargs, message):
    args = dict(layer="b", decomposition=_translating(2), channels=[0, 1], config=Config(preset=SMALL_PRESET))
    with pytest.raises(ValueError, match=message):
        refine(TINY, TINY_PARAMS, **{**args, **kwargs})


# Every layer (at 8x32x32, 4 channels, 100 steps) is measured by hand for the record, two here.
# Compiling is most of the cost: the optimisers run in unrolled chunks of 2 steps (a 10-step C3D
# chunk took 9.0 CPU s to compile, 2 steps 2.8 s; the chunk length changes rounding only, test_independence),
# and one batch of both channels is asked for, which spares the compiles that size a batch.
@pytest.mark.slow
@pytest.mark.parametrize("layer", ["conv2", "conv3b"])
def test_refined_c3d_kernels_keep_their_objective_and_their_motion(c3d_params, layer):
    channels, steps = [0, 1], 20
    start = maximize(C3D, c3d_params, layer, channels, config=preset(SMALL_PRESET, steps=steps, chunk=2), batch_size=2)
    dec = decompose(start.videos, config=decomposition.Config(steps=50), batch_size=2)
    refined = refine(C3D, c3d_params, layer, dec, channels, config=Config(steps=steps, preset=SMALL_PRESET, chunk=2),
                     batch_size=2)
    before, after = np.asarray(start.objective), np.asarray(refined.objective)
    # At least 80 % of the stage-1 objective (and no worse than 1.2 times a negative one).
    assert np.all(after >= before - 0.2 * np.abs(before)), f"{after} vs stage 1 {before}"
    # The start: the decomposition's displacement as the default motion allows it (its constant-velocity
    # fit), and the video that displacement makes of the static.
    fitted = used_displacement({"displacement": dec.displacement})
    was = motion_summary(dec.replace(displacement=fitted, reconstruction=warp_batch(dec.static, fitted)))
    now = motion_summary(refined)
    # The motion kept is the displacement field's: its observability-weighted mean (SPEC §4). These
    # random-weight optima are no rigid translation, so the videos' one translation reads < 0.5 px/frame.
    # Which optimum 20 steps find depends on the CPU's rounding: these starts' field means moved
    # 0.21-3.1 px/frame on an AVX-512 machine, > 0.5 on others, and kept their directions within 3.1 degrees.
    weight, velocity = np.asarray(was.weight)[..., None], np.asarray(was.velocity)
    field_speed = np.linalg.norm((weight * velocity).sum(axis=(1, 2, 3)) / weight.sum(axis=(1, 2, 3)), axis=-1)
    assert np.all(field_speed >= 0.1), "the start should move, or its direction is the read-out's noise"
    change = angular_difference(np.asarray(was.field_direction_deg), np.asarray(now.field_direction_deg))
    assert np.all(change < 45.0), f"directions {was.field_direction_deg} -> {now.field_direction_deg}"


@pytest.mark.slow
def test_visualize_refine_stores_and_draws_stage_3_beside_stage_2(tmp_path):
    assert build_parser().parse_args(["visualize", "--refine"]).refine == DEFAULT_STEPS
    assert build_parser().parse_args(["visualize", "--refine", "7"]).refine == 7
    assert build_parser().parse_args(["visualize", "--refine-motion", "free"]).refine_motion == "free"
    assert build_parser().parse_args(["visualize"]).refine_motion == Config().motion
    # Not the default motion, so that the setting is seen to reach the refinement.
    job = Job(model="tiny", preset="native", steps=4, decompose_steps=4, seed=5, refine_steps=4, refine_motion="free",
              batch=2, media="gif")
    pipeline.visualize(TINY, TINY_PARAMS, job, ["b"], "1", tmp_path)
    record = dict(np.load(tmp_path / "kernels" / "b" / "1.npz"))
    # Stage 3 starts from stage 2's result with the key compute_chunk documents; the stages run in
    # batches of job.batch kernels per device, as compute_chunk runs them.
    key = pipeline.layer_key(5, "b")
    stage1 = maximize(TINY, TINY_PARAMS, "b", [1], config=job.stage1(TINY, "b"), key=jax.random.fold_in(key, 1),
                      per_device=job.batch)
    dec = decompose(stage1.videos, [1], config=job.stage2(), key=jax.random.fold_in(key, 2), per_device=job.batch)
    expected = refine(TINY, TINY_PARAMS, "b", dec, [1], key=jax.random.fold_in(key, 3), config=job.stage3(TINY, "b"),
                      per_device=job.batch)
    assert job.stage3(TINY, "b") == Config(motion="free", steps=4, preset=preset("native", rectify=False))
    # Bit for bit, as stored: pictures and displacements in float16, the objective in float32.
    for name in ("static", "displacement", "video", "objective"):
        stored = record[f"refined_{name}"]
        np.testing.assert_array_equal(stored, np.asarray(getattr(expected, name))[0].astype(stored.dtype),
                                      err_msg=name)
    np.testing.assert_allclose(record["refined_direction_deg"], motion_summary(expected).direction_deg[0], atol=1e-3)
    names = {p.name for p in (tmp_path / "b").iterdir()}
    assert {"tiny_b_1_static.png", "tiny_b_1_refined_static.png", "tiny_b_1_refined_motion.gif",
            "tiny_b_1_refined_video.gif", "tiny_b_1_refined_deform.gif"} <= names
    assert "4 refinement steps (free motion)" in (tmp_path / "b.html").read_text()
    with pytest.raises(ValueError, match="refine_steps must be at least 1"):
        dataclasses.replace(job, refine_steps=-1)
    with pytest.raises(ValueError, match="unknown refine_motion 'rigid'; valid ones are: constant, free"):
        dataclasses.replace(job, refine_motion="rigid")


@pytest.mark.slow
@pytest.mark.parametrize("parameterization", ["static_displacement", "static_velocity"])
def test_stage_1_optimises_the_warp_parameterizations_too(parameterization):
    run = lambda steps: maximize(TINY, TINY_PARAMS, "b", [3], batch_size=1,
                                 config=preset(SMALL_PRESET, steps=steps, chunk=1, parameterization=parameterization))
    assert float(run(8).objective[0]) > float(run(1).objective[0])
