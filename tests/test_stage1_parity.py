"""Stage 1's pieces against independent PyTorch code written from SPEC §2 (torch CPU).

The jitter is compared with ``affine_grid`` + ``grid_sample`` (``align_corners=False``)
given the normalised matrix kornia's ``warp_affine3d`` builds, the resize with
``F.interpolate(mode="trilinear", align_corners=True)``, and one whole optimisation step
with ``torch.optim.Adam`` on a small two-layer Conv3d network.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kv3d_jax import objectives, parameterizations, transforms
from kv3d_jax.maximization import Config as Preset, init_state, make_step
from kv3d_jax.models.base import VideoModel

# SPEC §2 item 2, typed in again rather than imported.
COLOR = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=torch.float64)
COLOR = (COLOR / COLOR.norm(dim=0).max()).float()
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])


def torch_video(param: torch.Tensor) -> torch.Tensor:
    """``sigmoid(P @ C.T)`` for a pixel parameter ``(..., 3)``."""
    return torch.sigmoid(param @ COLOR.T)


def kornia_theta(dx, dy, dt, s, shape) -> torch.Tensor:
    """kornia ``warp_affine3d``'s ``(3, 4)`` input to ``affine_grid``: ``N M⁻¹ N⁻¹``, where
    ``M`` maps source to destination pixels and ``N`` maps pixels to [-1, 1] corner to corner."""
    d, h, w = shape
    m = torch.tensor([[s, 0, 0, dx], [0, s, 0, dy], [0, 0, s, dt], [0, 0, 0, 1]], dtype=torch.float64)
    n = torch.tensor([[2 / (w - 1), 0, 0, -1], [0, 2 / (h - 1), 0, -1], [0, 0, 2 / (d - 1), -1], [0, 0, 0, 1]],
                     dtype=torch.float64)
    return (n @ torch.linalg.inv(m) @ torch.linalg.inv(n))[:3].float()


def torch_jitter(video: torch.Tensor, dx, dy, dt, s) -> torch.Tensor:
    """``video`` ``(N, C, T, H, W)`` through kornia's warp (trilinear, zeros outside, align_corners=False)."""
    theta = kornia_theta(dx, dy, dt, s, video.shape[2:])[None].expand(video.shape[0], 3, 4)
    grid = F.affine_grid(theta, list(video.shape), align_corners=False)
    return F.grid_sample(video, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def to_torch(video) -> torch.Tensor:
    """``(T, H, W, C)`` -> ``(1, C, T, H, W)``."""
    return torch.from_numpy(np.array(video)).permute(3, 0, 1, 2)[None]


def from_torch(video: torch.Tensor) -> np.ndarray:
    """``(1, C, T, H, W)`` -> ``(T, H, W, C)``."""
    return video[0].permute(1, 2, 3, 0).detach().numpy()


def smooth_video(rng, shape, grid=(4, 6, 6)) -> np.ndarray:
    """A random video in [0, 1] with structure coarser than a pixel (trilinear from a coarse grid)."""
    coarse = torch.from_numpy(rng.random((1, 3, *grid), dtype=np.float32))
    return from_torch(F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True))


def test_decorrelate_and_sigmoid():
    param = np.random.default_rng(0).normal(size=(4, 6, 5, 3)).astype(np.float32) * 2
    got = parameterizations.pixel_to_video(jnp.asarray(param))
    np.testing.assert_allclose(got, torch_video(torch.from_numpy(param)).numpy(), atol=1e-5, rtol=0)


def test_pixel_init_is_small_gaussian_noise():
    param = np.asarray(parameterizations.pixel_init(jax.random.PRNGKey(0), (16, 128, 128)))
    assert param.shape == (16, 128, 128, 3)
    assert abs(param.mean()) < 1e-4 and abs(param.std() - 0.01) < 1e-4


def test_fourier_video_is_1_over_f_noise_through_decorrelation():
    t, h, w = 4, 6, 8
    param = np.array(parameterizations.fourier_init(jax.random.PRNGKey(1), (t, h, w)))
    assert param.shape == (t, h, w // 2 + 1, 3, 2)
    ft = torch.fft.fftfreq(t)[:, None, None]
    fy = torch.fft.fftfreq(h)[None, :, None]
    fx = torch.fft.rfftfreq(w)[None, None, :]
    gain = 1 / torch.clamp((ft**2 + fy**2 + fx**2).sqrt(), min=1 / max(t, h, w)) * (t * h * w) ** 0.5
    spectrum = torch.complex(torch.from_numpy(param[..., 0]), torch.from_numpy(param[..., 1])) * gain[..., None]
    pre = torch.fft.irfftn(spectrum, s=(t, h, w), dim=(0, 1, 2)) / 4
    got = parameterizations.fourier_to_video(jnp.asarray(param))
    np.testing.assert_allclose(got, torch_video(pre).numpy(), atol=1e-5, rtol=0)


DRAWS = [(0, 0, 0, 1.0), (3, 5, 2, 1.0), (7, 1, 3, 0.9), (2, 6, 1, 1.1), (5, 0, 3, 0.96), (0, 7, 0, 1.04)]


@pytest.mark.parametrize("dx, dy, dt, s", DRAWS)
def test_jitter_matches_affine_grid_and_grid_sample(dx, dy, dt, s):
    video = np.random.default_rng(1).random((8, 20, 27, 3), dtype=np.float32)
    jitter = transforms.Jitter(*(jnp.float32(v) for v in (dx, dy, dt, s)))
    got = transforms.apply(jnp.asarray(video), transforms.jitter_matrices(jitter, video.shape[:3]))
    np.testing.assert_allclose(got, from_torch(torch_jitter(to_torch(video), dx, dy, dt, s)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dx, dy, dt, s", DRAWS[2:4])
def test_jitter_at_the_paper_size(dx, dy, dt, s):
    # At 128 px a float32 coordinate is only good to ~4e-6 px in either library, so the
    # video is smooth enough that such an error stays far below the tolerance.
    video = smooth_video(np.random.default_rng(2), (16, 128, 128))
    jitter = transforms.Jitter(*(jnp.float32(v) for v in (dx, dy, dt, s)))
    got = transforms.apply(jnp.asarray(video), transforms.jitter_matrices(jitter, video.shape[:3]))
    np.testing.assert_allclose(got, from_torch(torch_jitter(to_torch(video), dx, dy, dt, s)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape, size", [((16, 128, 128), (32, 224, 224)), ((5, 7, 9), (11, 4, 19))])
def test_resize_matches_trilinear_interpolate(shape, size):
    video = np.random.default_rng(3).random((*shape, 3), dtype=np.float32)
    got = transforms.apply(jnp.asarray(video), transforms.resize_matrices(shape, size))
    want = F.interpolate(to_torch(video), size=size, mode="trilinear", align_corners=True)
    np.testing.assert_allclose(got, from_torch(want), atol=1e-5, rtol=0)


def test_normalize_matches_imagenet_formula():
    video = np.random.default_rng(4).random((3, 4, 5, 3), dtype=np.float32)
    got = transforms.normalize(jnp.asarray(video), IMAGENET_MEAN.tolist(), IMAGENET_STD.tolist())
    np.testing.assert_allclose(got, ((torch.from_numpy(video) - IMAGENET_MEAN) / IMAGENET_STD).numpy(),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("rectify", [False, True])
def test_objectives_match_their_formulas(rectify):
    rng = np.random.default_rng(5)
    act = rng.normal(size=(3, 5, 4, 6)).astype(np.float32)
    weights = rng.normal(size=6).astype(np.float32)
    a = torch.from_numpy(act).clamp(min=0) if rectify else torch.from_numpy(act)
    want = {
        "channel": a[..., 4].mean(),
        "neuron": a[1, 2, 2, 4],
        "weighted": (a * torch.from_numpy(weights)).sum(-1).mean(),
    }
    for name, value in want.items():
        target = jnp.asarray(weights) if name == "weighted" else jnp.int32(4)
        got = objectives.get(name, rectify)(jnp.asarray(act), target)
        np.testing.assert_allclose(got, value.numpy(), atol=1e-5, rtol=0, err_msg=name)


class TinyTorchNet(torch.nn.Module):
    """conv1 -> ReLU -> conv2 (stride 1, 2, 2), tapped at conv2 (before its ReLU).

    No max pool: where the jitter's zero padding makes a pooling window constant, PyTorch
    and XLA break the tie differently and route the gradient to different pixels.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv3d(3, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv3d(4, 5, 3, padding=1, stride=(1, 2, 2))

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


def tiny_video_model(net: TinyTorchNet) -> tuple[VideoModel, dict]:
    """``net`` by hand as a :class:`VideoModel` (OIDHW kernels transposed to DHWIO) and its params."""

    def conv(x, p, stride):
        y = jax.lax.conv_general_dilated(x, p["kernel"], stride, ((1, 1),) * 3,
                                         dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        return y + p["bias"]

    def apply(params, video, upto):
        x = conv(video, params["params"]["conv1"], (1, 1, 1))
        if upto == "conv1":
            return x
        return conv(jax.nn.relu(x), params["params"]["conv2"], (1, 2, 2))

    params = {"params": {
        name: {"kernel": jnp.asarray(m.weight.detach().permute(2, 3, 4, 1, 0).numpy()),
               "bias": jnp.asarray(m.bias.detach().numpy())}
        for name, m in (("conv1", net.conv1), ("conv2", net.conv2))
    }}
    model = VideoModel(name="tiny", apply=apply, layers=("conv1", "conv2"), input_shape=(6, 14, 16),
                       linear_layers=frozenset({"conv1"}))
    return model, params


def test_one_optimisation_step_matches_torch_adam():
    torch.manual_seed(0)
    net = TinyTorchNet()
    model, params = tiny_video_model(net)
    preset = Preset(shape=(4, 10, 12), resize=(6, 14, 16), normalization="imagenet")
    channels = np.array([1, 3])
    keys = jax.random.split(jax.random.PRNGKey(7), 2)
    state = init_state(jax.random.split(jax.random.PRNGKey(8), 2), channels, preset.shape)
    new_state, value = jax.jit(make_step(model, "conv2", preset))(params, state, keys)

    # The same step in PyTorch, with the jitter each kernel drew from its key.
    pixels = torch.from_numpy(np.array(state.param)).requires_grad_(True)
    optimizer = torch.optim.Adam([pixels], lr=0.05)
    losses = []
    for k, channel in enumerate(channels):
        draw = [float(v) for v in transforms.random_jitter(keys[k])]
        x = torch_jitter(torch_video(pixels[k]).permute(3, 0, 1, 2)[None], *draw)
        x = (x - IMAGENET_MEAN.reshape(1, 3, 1, 1, 1)) / IMAGENET_STD.reshape(1, 3, 1, 1, 1)
        x = F.interpolate(x, size=preset.resize, mode="trilinear", align_corners=True)
        losses.append(-net(x)[0, channel].mean())
    optimizer.zero_grad()
    torch.stack(losses).sum().backward()
    optimizer.step()

    np.testing.assert_allclose(value, -torch.stack(losses).detach().numpy(), rtol=1e-5, atol=1e-6)
    want = pixels.detach().numpy()
    assert np.abs(np.asarray(new_state.param) - want).max() <= 1e-4 * np.abs(want).max()
