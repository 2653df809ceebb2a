"""What a run stores and draws for one kernel: the :class:`KernelRecord` schema.

The store checks kernel files against :meth:`KernelRecord.arrays`, the writers name a kernel's
pictures by :meth:`KernelRecord.files`, the gallery shows a kernel as
:meth:`KernelRecord.view` makes it, and ``kv3d agreement`` reads the same fields: one schema,
so that none of them knows the record's fields on its own.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

import jax
import jax.numpy as jnp

from kv3d_jax import diversity, gallery, writers
from kv3d_jax.warp import warp

# The formats moving pictures can be written in; the first is the default.
MEDIA = writers.MEDIA
# A kernel's summary of stages 1 and 2: objective, dominant motion and reconstruction quality.
SUMMARY = ("objective", "direction_deg", "speed", "psnr", "failed")
# How far a kernel's pictures can be trusted (kv3d_jax.reliability); booleans stored as 0/1.
TRUST = ("reliability", "reliable", "dead", "aliased", "gain", "explained")
# What the refinement (stage 3) adds to a record, each name prefixed "refined_".
REFINED = ("video", "static", "displacement", "objective", "direction_deg", "speed")
# The arrays stored as float16: pictures in [0, 1] (to 2.4e-4) and displacements in px (to 1/2048
# of their size, 0.005 px at 10 px), for a record a fifth of float32's. Summaries are computed
# from the float32 results before they are stored, and stay float32.
HALF = ("video", "static", "displacement", "refined_video", "refined_static", "refined_displacement",
        "diverse_video")


@dataclasses.dataclass(frozen=True)
class KernelRecord:
    """The record of every kernel of a run.

    Attributes:
      shape: ``(T, H, W)`` of the optimised videos.
      refined: whether the run has stage 3, whose arrays and pictures are added.
      media: the format of the moving pictures (:data:`MEDIA`).
      attribution: whether each kernel has an attribution map of its stage-1 video
        (``"attribution"`` ``(T, H, W)``, objective units per unit of pixel value,
        :func:`kv3d_jax.maximization.attribution`) and the video drawn through it.
      slowfast: whether the run computes each kernel's slow/fast index, stored as ``slowness``
        (float32 ``()``, dimensionless, high = slow; NaN where it does not apply, :mod:`kv3d_jax.slowfast`).
      diversity: N, the diverse optima of each kernel (:mod:`kv3d_jax.diversity`), or 0 for none. With
        N: ``diverse_video`` ``(N, T, H, W, 3)`` (each min–max normalised to [0, 1]), ``diverse_objective``
        ``(N,)`` (each optimum's unjittered objective) and ``diverse_cosine`` ``(N, N)`` (the cosines of
        their activation patterns, :attr:`kv3d_jax.diversity.DiverseResult.cosine`); all three NaN for a
        kernel whose diverse run turned non-finite (its ``failed`` counts stages 1-3 only).
    """

    shape: tuple[int, int, int]
    refined: bool = False
    media: str = MEDIA[0]
    attribution: bool = False
    slowfast: bool = False
    diversity: int = 0

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Name → (shape, dtype) of every array stored for a kernel: :data:`HALF` float16, the rest
        float32 (an attribution map too: its gradients can exceed float16's range). Stage 2's
        reconstruction is not stored: it is ``warp(static, displacement)`` (:meth:`reconstruction`)."""
        t, h, w = self.shape
        shapes = {
            "video": (t, h, w, 3),
            "static": (h, w, 3),
            "displacement": (t, h, w, 2),
            **{name: () for name in SUMMARY + TRUST},
        }
        if self.refined:
            shapes.update({f"refined_{name}": shapes[name] for name in REFINED})
        if self.attribution:
            shapes["attribution"] = (t, h, w)
        if self.slowfast:
            shapes["slowness"] = ()
        if self.diversity:
            n = self.diversity
            shapes.update(diverse_video=(n, t, h, w, 3), diverse_objective=(n,), diverse_cosine=(n, n))
        return {name: (shape, "float16" if name in HALF else "float32") for name, shape in shapes.items()}

    def stored(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The arrays of :meth:`arrays`, taken from a kernel's results ``arrays`` and cast to their dtypes."""
        return {name: np.asarray(arrays[name]).astype(dtype) for name, (_, dtype) in self.arrays().items()}

    @staticmethod
    def reconstruction(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """Stage 2's reconstruction ``(T, H, W, 3)`` in [0, 1] from a record's static and displacement."""
        return np.asarray(_warp(np.asarray(arrays["static"], np.float32), np.asarray(arrays["displacement"], np.float32)))

    def kinds(self) -> tuple[str, ...]:
        """The kinds of picture drawn for a kernel (:data:`kv3d_jax.writers.DECOMPOSITION_FILES`,
        :data:`kv3d_jax.writers.REFINEMENT_FILES` for a refined run and
        :data:`kv3d_jax.writers.ATTRIBUTION_FILES` for one with attribution maps,
        :data:`kv3d_jax.writers.DIVERSITY_FILES` for one with diverse optima)."""
        return (writers.DECOMPOSITION_FILES + (writers.REFINEMENT_FILES if self.refined else ())
                + (writers.ATTRIBUTION_FILES if self.attribution else ())
                + (writers.DIVERSITY_FILES if self.diversity else ()))

    def files(self, model: str, layer: str, channel: int) -> dict[str, str]:
        """Kind → file name of every picture of kernel ``(layer, channel)`` of ``model``."""
        stem = writers.kernel_stem(model, layer, channel)
        return {kind: writers.media_file(stem, kind, self.media) for kind in self.kinds()}

    def view(self, layer: str, channel: int, arrays: Mapping[str, np.ndarray], files: Mapping[str, str],
             name: str = "") -> gallery.KernelView:
        """Kernel ``(layer, channel)`` as a layer page shows it, from its stored ``arrays`` and
        its pictures ``files`` (kind → path relative to the page)."""
        return gallery.KernelView(
            channel=int(channel), objective=float(arrays["objective"]), direction_deg=float(arrays["direction_deg"]),
            speed=float(arrays["speed"]), psnr=float(arrays["psnr"]), media=dict(files),
            reliability=float(arrays["reliability"]), reliable=bool(arrays["reliable"]), dead=bool(arrays["dead"]),
            aliased=bool(arrays["aliased"]), failed=int(arrays["failed"]), name=name,
            slowness=float(arrays["slowness"]) if self.slowfast else float("nan"),
            **(_diverse_view(arrays) if self.diversity else {}),
        )


def _diverse_view(arrays: Mapping[str, np.ndarray]) -> dict:
    """The :class:`kv3d_jax.gallery.KernelView` fields of a record's diverse optima: their objectives, the
    largest cosine between two of them, and whether the diverse run failed (its arrays are NaN)."""
    objective = np.asarray(arrays["diverse_objective"], np.float64)
    largest = float(diversity.off_diagonal(np.asarray(arrays["diverse_cosine"], np.float64)).max())
    return dict(diverse_objective=tuple(float(x) for x in objective), diverse_cosine=largest,
                diverse_failed=not np.all(np.isfinite(objective)))


@jax.jit
def _warp(static, displacement):
    return jnp.clip(warp(static, displacement), 0.0, 1.0)
