"""The CPU-fast convolution and max-pool of ``kv3d_jax.models.layers`` against PyTorch, values and input gradients.

Tolerance: float32; max |ours - PyTorch| <= 1e-5 x max |PyTorch| for values and gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kv3d_jax import objectives, zoo
from kv3d_jax.models.layers import Conv3d, convolve3d, max_pool3d

RELATIVE = 1e-5


def _close(ours, theirs):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= RELATIVE * np.abs(theirs).max()


def _torch_conv(x, kernel, strides, padding, groups):
    """PyTorch's conv3d on NTHWC / DHWIO arrays; ``padding`` pairs are applied with F.pad first."""
    xt = torch.tensor(np.asarray(x)).permute(0, 4, 1, 2, 3).requires_grad_(True)
    wt = torch.tensor(np.asarray(kernel)).permute(4, 3, 0, 1, 2)
    pads = [p for pair in reversed(padding) for p in pair]  # F.pad wants last axis first
    y = F.conv3d(F.pad(xt, pads), wt, stride=strides, groups=groups).permute(0, 2, 3, 4, 1)
    return xt, y


# (input NTHWC, kernel DHWIO, strides, padding pairs, groups): C3D's 3x3x3 with few and many
# channels, one output channel (both ways of computing it), strides, asymmetric padding,
# factorised (2+1)D kernels and groups.
CASES = [
    ((2, 5, 9, 8, 3), (3, 3, 3, 3, 7), (1, 1, 1), ((1, 1),) * 3, 1),
    ((1, 6, 9, 10, 40), (3, 3, 3, 40, 6), (1, 1, 1), ((1, 1),) * 3, 1),
    ((1, 6, 9, 10, 4), (3, 3, 3, 4, 1), (2, 1, 2), ((1, 0), (2, 1), (0, 1)), 1),
    ((1, 6, 9, 10, 40), (3, 3, 3, 40, 1), (2, 1, 2), ((1, 0), (2, 1), (0, 1)), 1),
    ((1, 6, 9, 10, 20), (3, 1, 1, 20, 6), (2, 1, 1), ((1, 1), (0, 0), (0, 0)), 1),
    ((1, 6, 9, 10, 8), (1, 3, 3, 4, 6), (1, 2, 2), ((0, 0), (1, 1), (1, 1)), 2),
    ((1, 7, 8, 8, 3), (5, 7, 7, 3, 5), (1, 2, 2), ((2, 2), (3, 3), (3, 3)), 1),
]


@pytest.mark.parametrize("x_shape, k_shape, strides, padding, groups", CASES)
def test_convolve3d_matches_torch_values_and_input_gradients(x_shape, k_shape, strides, padding, groups):
    x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
    kernel = jax.random.normal(jax.random.PRNGKey(1), k_shape)
    xt, yt = _torch_conv(x, kernel, strides, padding, groups)
    cotangent = np.random.default_rng(0).normal(size=yt.shape).astype(np.float32)
    (yt * torch.tensor(cotangent)).sum().backward()

    # Under jit, as the stages run it: one compile instead of one per operation.
    @jax.jit
    def value_and_input_gradient(x, cotangent):
        y, vjp = jax.vjp(lambda x: convolve3d(x, kernel, strides, padding, groups), x)
        return y, vjp(cotangent)[0]

    y, x_grad = value_and_input_gradient(x, jnp.asarray(cotangent))
    _close(y, yt.detach())
    _close(x_grad, xt.grad.permute(0, 2, 3, 4, 1))


def test_one_output_kernels_differing_per_vmapped_kernel():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 1, 6, 9, 10, 40))
    kernels = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 3, 3, 40, 1))
    ours = jax.jit(jax.vmap(lambda x, k: convolve3d(x, k, 1, 1)))(x, kernels)
    for i in range(4):
        _close(ours[i], _torch_conv(x[i], kernels[i], (1, 1, 1), ((1, 1),) * 3, 1)[1].detach())


def test_conv3d_projection_is_the_projected_output():
    module = Conv3d(6, (3, 3, 3), padding=((1, 1),) * 3)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 6, 6, 5))
    params = module.init(jax.random.PRNGKey(1), x)
    params = jax.tree.map(lambda p: p + 0.1, params)  # non-zero bias
    weights = jax.random.normal(jax.random.PRNGKey(2), (6,))
    apply = jax.jit(module.apply)
    _close(apply(params, x, weights)[..., 0], apply(params, x) @ weights)


@pytest.mark.parametrize("window", [(1, 2, 2), (2, 2, 2), (2, 3, 2)])
def test_max_pool_matches_torch_values_and_input_gradients(window):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 9, 7, 3))  # remainders dropped (floor mode)
    xt = torch.tensor(np.asarray(x)).permute(0, 4, 1, 2, 3).requires_grad_(True)
    yt = F.max_pool3d(xt, window, window).permute(0, 2, 3, 4, 1)
    cotangent = np.random.default_rng(0).normal(size=yt.shape).astype(np.float32)
    (yt * torch.tensor(cotangent)).sum().backward()
    y, vjp = jax.vjp(lambda x: max_pool3d(x, window, window), x)
    _close(y, yt.detach())
    _close(vjp(jnp.asarray(cotangent))[0], xt.grad.permute(0, 2, 3, 4, 1))


@pytest.mark.parametrize("name, rectify", [("channel", False), ("channel", True), ("neuron", True), ("weighted", False)])
def test_objectives_read_from_the_projection_equal_the_objectives(name, rectify):
    model, params = zoo.load("motionnet")
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 4, 16, 16, 3))
    target = jnp.asarray(5) if name != "weighted" else jax.random.normal(jax.random.PRNGKey(2), (32,))
    projection = objectives.projection(name, rectify)
    projected = model.projected_features(params, x, "conv2", projection.weights(target, 32))[0]
    expected = objectives.get(name, rectify)(model.features(params, x, "conv2")[0], target)
    np.testing.assert_allclose(projection.reduce(projected), expected, rtol=1e-5)


def test_a_rectified_weighted_sum_has_no_projection():
    assert objectives.projection("weighted", rectify=True) is None
