"""Bilinear warping against PyTorch's grid_sample, its border rule, and the Gaussian blur."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kv3d_jax.warp import gaussian_blur, inside, sample, warp, warp_batch


def _torch_warp(image: np.ndarray, displacement: np.ndarray):
    """Independent reference: grid_sample(border, align_corners=True) of ``image`` (H, W, C)
    by ``displacement`` (T, H, W, 2) px; returns the output and the torch leaf tensors."""
    t, h, w, _ = displacement.shape
    img = torch.tensor(image).permute(2, 0, 1)[None].requires_grad_(True)
    disp = torch.tensor(displacement, requires_grad=True)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    # align_corners=True: -1 and +1 are the centres of the first and last pixels.
    grid = torch.stack([(xs + disp[..., 0]) * 2 / (w - 1) - 1, (ys + disp[..., 1]) * 2 / (h - 1) - 1], dim=-1)
    out = F.grid_sample(img.expand(t, -1, -1, -1), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.permute(0, 2, 3, 1), img, disp


@pytest.mark.parametrize("h, w, spread", [(9, 13, 3.0), (16, 16, 0.7)])
def test_warp_and_its_gradients_match_grid_sample(h, w, spread):
    rng = np.random.default_rng(h * w)
    image = rng.random((h, w, 3), dtype=np.float32)
    # Some sample points land outside the image, so the border rule is exercised too.
    displacement = (rng.standard_normal((4, h, w, 2)) * spread).astype(np.float32)
    cotangent = rng.standard_normal((4, h, w, 3)).astype(np.float32)

    expected, img, disp = _torch_warp(image, displacement)
    (expected * torch.tensor(cotangent)).sum().backward()

    got = jax.jit(warp)(image, displacement)
    grad_image, grad_disp = jax.jit(jax.grad(lambda i, d: jnp.sum(warp(i, d) * cotangent), (0, 1)))(
        image, displacement
    )
    np.testing.assert_allclose(np.asarray(got), expected.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_image), img.grad[0].permute(1, 2, 0).numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_disp), disp.grad.numpy(), atol=1e-5)


def test_zero_displacement_is_identity_and_integer_shift_moves_content():
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.random((8, 10, 3), dtype=np.float32))
    warp_jit = jax.jit(warp)
    np.testing.assert_array_equal(np.asarray(warp_jit(image, jnp.zeros((8, 10, 2)))), np.asarray(image))
    # D = (+2, -1): V̂(x, y) = I(x + 2, y - 1).
    shifted = warp_jit(image, jnp.broadcast_to(jnp.array([2.0, -1.0]), (8, 10, 2)))
    np.testing.assert_allclose(np.asarray(shifted)[1:, :-2], np.asarray(image)[:-1, 2:], atol=1e-6)


def test_points_outside_read_the_clamped_border():
    image = jnp.asarray(np.random.default_rng(1).random((6, 7, 2), dtype=np.float32))
    far_right = jax.jit(warp)(image, jnp.broadcast_to(jnp.array([100.0, 0.0]), (6, 7, 2)))
    np.testing.assert_allclose(np.asarray(far_right), np.broadcast_to(np.asarray(image)[:, -1:], (6, 7, 2)), atol=1e-6)
    corner = jax.jit(sample)(image, jnp.array([[-5.0, -3.0], [50.0, 40.0]]))
    np.testing.assert_allclose(np.asarray(corner), np.asarray(image)[[0, -1], [0, -1]], atol=1e-6)


def test_warp_batch_and_vmapped_warp_match_grid_sample_with_gradients():
    # warp_batch flattens the batch into one gather table; under vmap (the runner's kernels) the
    # gather is batched instead. Both, values and gradients, against torch per image.
    rng = np.random.default_rng(2)
    images = rng.random((3, 5, 6, 3), dtype=np.float32)
    displacements = (2.0 * rng.standard_normal((3, 2, 5, 6, 2))).astype(np.float32)
    cotangent = rng.standard_normal((3, 2, 5, 6, 3)).astype(np.float32)
    loss = lambda fn: jax.jit(jax.value_and_grad(lambda i, d: jnp.sum(fn(i, d) * cotangent), (0, 1)))
    for name, fn in (("warp_batch", warp_batch), ("vmap(warp)", jax.vmap(warp))):
        got = np.asarray(jax.jit(fn)(images, displacements))
        _, (grad_images, grad_disp) = loss(fn)(images, displacements)
        for k in range(3):
            expected, img, disp = _torch_warp(images[k], displacements[k])
            (expected * torch.tensor(cotangent[k])).sum().backward()
            np.testing.assert_allclose(got[k], expected.detach().numpy(), atol=1e-5, err_msg=name)
            np.testing.assert_allclose(np.asarray(grad_images[k]), img.grad[0].permute(1, 2, 0).numpy(), atol=1e-5,
                                       err_msg=name)
            np.testing.assert_allclose(np.asarray(grad_disp[k]), disp.grad.numpy(), atol=1e-5, err_msg=name)


def test_non_finite_points_stay_inside_their_own_image():
    images = jnp.stack([jnp.zeros((4, 5, 1)), jnp.ones((4, 5, 1))])
    displacements = jnp.zeros((2, 4, 5, 2)).at[0, 1, 2].set(jnp.array([jnp.nan, jnp.inf]))
    cotangent = jnp.ones((2, 4, 5, 1))
    for fn in (warp_batch, jax.vmap(warp)):
        out = np.asarray(jax.jit(fn)(images, displacements))
        grad = np.asarray(jax.jit(jax.grad(lambda i: jnp.sum(fn(i, displacements) * cotangent)))(images))
        np.testing.assert_array_equal(out[1], 1.0)  # the second image never reads the first's pixels
        np.testing.assert_array_equal(out[0], 0.0)
        np.testing.assert_allclose(grad.sum(axis=(1, 2, 3)), [20.0, 20.0])  # every pixel's weight lands in its image


def test_inside_marks_sample_points_in_the_image():
    displacement = jnp.zeros((4, 5, 2)).at[0, 0].set(jnp.array([-0.5, 0.0])).at[3, 4].set(jnp.array([0.0, 0.5]))
    mask = np.asarray(inside(displacement))
    assert not mask[0, 0] and not mask[3, 4] and mask.sum() == 18
    assert np.asarray(inside(jnp.zeros((4, 5, 2)), margin=1.0)).sum() == 2 * 3


def test_gaussian_blur_matches_replicate_padded_convolution():
    rng = np.random.default_rng(3)
    images = rng.random((2, 11, 17, 3), dtype=np.float32)
    sigma = 1.5
    radius = int(3 * sigma + 0.5)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    taps = taps / taps.sum()
    x = torch.tensor(images).permute(0, 3, 1, 2).reshape(6, 1, 11, 17)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), taps.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), taps.view(1, 1, -1, 1))
    expected = x.reshape(2, 3, 11, 17).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(gaussian_blur(jnp.asarray(images), sigma)), expected, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(gaussian_blur(jnp.asarray(images), 0.0)), images)


def test_bad_shapes_name_the_problem():
    with pytest.raises(ValueError, match="warp needs image"):
        warp(jnp.zeros((4, 4, 3)), jnp.zeros((4, 5, 2)))
    with pytest.raises(ValueError, match="warp_batch needs"):
        warp_batch(jnp.zeros((2, 4, 4, 3)), jnp.zeros((3, 4, 4, 2)))
