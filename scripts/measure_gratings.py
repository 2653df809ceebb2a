"""Measures the dominant-motion read-out (``motion.translation``) on drifting gratings (docs/readout.md).

Gratings of 16 x 64 x 64 px (``stimuli.drifting_grating``) every 15 degrees, at spatial frequencies
0.05-0.25 cycles/px and 0.5, 1 and 2 px/frame (those below ``motion.ALIAS_FREQUENCY``, 0.4
cycles/frame, where a speed is not ambiguous), and smooth textures translating every 30 degrees at 0.5-3 px/frame: the direction
error (degrees) and the speed ratio of each, as JSON. A grating's frames constrain only the motion
across its stripes, so its true motion is its normal velocity, the one ``drifting_grating`` is
given.

    .venv/bin/python scripts/measure_gratings.py
"""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

from kv3d_jax import motion
from kv3d_jax.tuning import angular_difference
from kv3d_jax.stimuli import drifting_grating, translating_texture, velocity_from_direction

SPATIAL_FREQS = (0.05, 0.1, 0.15, 0.2, 0.25)
SPEEDS = (0.5, 1.0, 2.0)


def _errors(estimates: np.ndarray, directions, speeds) -> tuple[np.ndarray, np.ndarray]:
    """Angular errors (degrees) and speed ratios of ``estimates`` ``(N, 2)`` against the truth."""
    got = np.asarray(motion.direction_deg(estimates[:, 0], estimates[:, 1]))
    return angular_difference(got, np.asarray(directions)), np.linalg.norm(estimates, axis=1) / speeds


def _summary(error: np.ndarray, ratio: np.ndarray) -> dict:
    return {"n": int(len(error)), "direction_error_median": float(np.median(error)),
            "direction_error_p90": float(np.percentile(error, 90)), "direction_error_max": float(error.max()),
            "within_5_deg": float(np.mean(error <= 5.0)), "speed_within_10_percent": float(np.mean(np.abs(ratio - 1) <= 0.1)),
            "speed_ratio_min": float(ratio.min()), "speed_ratio_max": float(ratio.max())}


def main() -> None:
    translation = jax.jit(motion.translation)
    gratings = [(d, f, s) for d, f, s in itertools.product(range(0, 360, 15), SPATIAL_FREQS, SPEEDS)
                if f * s < motion.ALIAS_FREQUENCY]
    estimates = np.stack([np.asarray(translation(drifting_grating(16, 64, 64, d, f, f * s))) for d, f, s in gratings])
    error, ratio = _errors(estimates, [d for d, _, _ in gratings], np.array([s for _, _, s in gratings]))
    freqs = np.array([f for _, f, _ in gratings])
    report = {"gratings": _summary(error, ratio),
              "gratings_by_spatial_freq": {str(f): _summary(error[freqs == f], ratio[freqs == f]) for f in SPATIAL_FREQS}}
    textures = list(itertools.product(range(0, 360, 30), (0.5, 1.0, 2.0, 3.0)))
    videos = [translating_texture(np.random.default_rng(k), 16, 64, 64, velocity_from_direction(d, s))
              for k, (d, s) in enumerate(textures)]
    estimates = np.stack([np.asarray(translation(jnp.asarray(video))) for video in videos])
    report["textures"] = _summary(*_errors(estimates, [d for d, _ in textures], np.array([s for _, s in textures])))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
