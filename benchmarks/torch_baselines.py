"""Two PyTorch baselines for stage 1 at the paper preset (SPEC §2, §7), timed in kernel-steps/s.

* ``reference_faithful``: what the reference code does — one kernel at a time, forward hooks
  on every module, the whole network run forward (a ``RuntimeError`` past the tapped layer is
  swallowed, as the reference does when the resized clip no longer fits the classifier), weight
  gradients left on, the jitter through ``affine_grid``/``grid_sample``.
* ``strong``: what a careful PyTorch user would write — all kernels in one batch, each with its
  own jitter, the forward stopped at the tapped layer, no weight gradients.

Both follow SPEC §2: pixel parameter (16, 128, 128, 3) ~ N(0, 0.01²), colour decorrelation +
sigmoid, random shift/scale affine, ImageNet normalisation, trilinear resize to (32, 224, 224)
with ``align_corners=True``, objective −mean activation of the channel, Adam(0.05).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

COLOR_CORRELATION = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
COLOR_SQRT = COLOR_CORRELATION / COLOR_CORRELATION.norm(dim=0).max()
MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1, 1)
SCALES = [1 + (i - 5) / 50.0 for i in range(11)]


def to_video(pixels: torch.Tensor) -> torch.Tensor:
    """``(N, 3, T, H, W)`` pixel parameter -> video in [0, 1] (colour decorrelation + sigmoid)."""
    return torch.sigmoid(torch.einsum("nctyx,dc->ndtyx", pixels, COLOR_SQRT.to(pixels.device)))


def affine_theta(dx: float, dy: float, dt: float, s: float, shape) -> torch.Tensor:
    """kornia ``warp_affine3d``'s normalised ``(3, 4)`` sampling matrix for shift+scale about (0, 0, 0).

    kornia maps source to destination pixels with ``M`` and normalises with its pixel→[-1, 1]
    matrix ``N`` (corner pixels at ±1), so ``affine_grid`` gets ``N M⁻¹ N⁻¹``.
    """
    d, h, w = shape
    m = torch.tensor([[s, 0, 0, dx], [0, s, 0, dy], [0, 0, s, dt], [0, 0, 0, 1.0]], dtype=torch.float64)
    n = torch.tensor([[2 / (w - 1), 0, 0, -1], [0, 2 / (h - 1), 0, -1], [0, 0, 2 / (d - 1), -1],
                      [0, 0, 0, 1.0]], dtype=torch.float64)
    return (n @ torch.linalg.inv(m) @ torch.linalg.inv(n))[:3].float()


def jitter(video: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Each clip of ``video`` ``(N, 3, T, H, W)`` shifted and scaled by its own random draw."""
    shape = video.shape[2:]
    thetas = torch.stack([
        affine_theta(rng.integers(8), rng.integers(8), rng.integers(4), rng.choice(SCALES), shape)
        for _ in range(video.shape[0])
    ]).to(video.device)
    grid = F.affine_grid(thetas, list(video.shape), align_corners=False)
    return F.grid_sample(video, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def preprocess(video: torch.Tensor, resize=(32, 224, 224)) -> torch.Tensor:
    """ImageNet normalisation, then trilinear resize to ``resize`` with ``align_corners=True``."""
    normalised = (video - MEAN.to(video.device)) / STD.to(video.device)
    return F.interpolate(normalised, size=resize, mode="trilinear", align_corners=True)


def _synchronize(device: torch.device) -> None:
    """Waits for the device's queued work, so that wall-clock time measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tapped_module(model: torch.nn.Module, layer: str) -> torch.nn.Module:
    """The submodule whose kv3d layer name (module path with ``.`` → ``_``) is ``layer``."""
    modules = {name.replace(".", "_"): m for name, m in model.named_modules() if name}
    if layer not in modules:
        raise ValueError(f"no layer {layer!r}; valid layers are: {', '.join(modules)}")
    return modules[layer]


class _Stop(Exception):
    """Raised by the tap hook to end the forward pass at the tapped layer."""


def reference_faithful(model, layer, channels, steps, seed=0, size=(16, 128, 128), warmup=1,
                       resize=(32, 224, 224)) -> float:
    """Kernel-steps/s of the reference's loop on the model's device; weights keep ``requires_grad=True``.

    ``warmup`` untimed steps of the first kernel run first (oneDNN builds its kernels then).
    """
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device
    features = {}
    for p in model.parameters():
        p.requires_grad_(True)
    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: features.__setitem__(name, o))
        for name, module in model.named_modules() if name
    ]
    tapped = next(n for n, m in model.named_modules() if m is tapped_module(model, layer))

    def optimise(channel, steps):
        pixels = (torch.randn(1, 3, *size, device=device) * 0.01).requires_grad_(True)
        optimizer = torch.optim.Adam([pixels], lr=0.05)
        for _ in range(steps):
            optimizer.zero_grad()
            try:
                model(preprocess(jitter(to_video(pixels), rng), resize))
            except RuntimeError:
                pass
            loss = -features[tapped][:, channel].mean()
            loss.backward()
            optimizer.step()

    optimise(channels[0], warmup)
    _synchronize(device)
    start = time.perf_counter()
    for channel in channels:
        optimise(channel, steps)
    _synchronize(device)
    seconds = time.perf_counter() - start
    for handle in handles:
        handle.remove()
    return len(channels) * steps / seconds


def strong(model, layer, channels, steps, seed=0, size=(16, 128, 128), warmup=1, resize=(32, 224, 224)) -> float:
    """Kernel-steps/s with all kernels batched, a truncated forward and no weight gradients,
    on the model's device.

    ``warmup`` untimed steps run first.
    """
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    out = {}

    def tap(module, inputs, output):
        out["act"] = output
        raise _Stop

    handle = tapped_module(model, layer).register_forward_hook(tap)
    index = torch.tensor(channels, device=device)
    pixels = (torch.randn(len(channels), 3, *size, device=device) * 0.01).requires_grad_(True)
    optimizer = torch.optim.Adam([pixels], lr=0.05)

    def optimise(steps):
        for _ in range(steps):
            optimizer.zero_grad()
            try:
                model(preprocess(jitter(to_video(pixels), rng), resize))
            except _Stop:
                pass
            act = out["act"][torch.arange(len(channels), device=device), index]
            loss = -act.mean(dim=(1, 2, 3)).sum()
            loss.backward()
            optimizer.step()

    optimise(warmup)
    _synchronize(device)
    start = time.perf_counter()
    optimise(steps)
    _synchronize(device)
    seconds = time.perf_counter() - start
    handle.remove()
    return len(channels) * steps / seconds
