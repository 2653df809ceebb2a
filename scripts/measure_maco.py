"""Measures the MACO parameterization against pixel and fourier at equal steps (docs/maco.md).

For each parameterization, stage 1 optimises the same channels of one layer with the same preset,
steps and seed; the script prints, as JSON, the objectives reached, the ratio of each
parameterization's mean objective to pixel's and the mean per-channel ratio over the channels that
pixel activates, and the spatial and temporal power-spectrum slopes of the optimal videos
(:func:`kv3d_jax.spectrum.power_slopes`) beside the natural-video law's: its nominal slopes ``-2a, -2b`` and those measured on MACO's random-phase
starting videos, which go through the same colour transform, sigmoid and min-max normalisation.

    .venv/bin/python scripts/measure_maco.py --model motionnet --layer conv4 --channels 0-7
    .venv/bin/python scripts/measure_maco.py --model inception_i3d --layer Mixed_4b --channels 0-3 --steps 50
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from kv3d_jax import maximization, pipeline, spectrum, zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="motionnet")
    parser.add_argument("--layer", default="conv4")
    parser.add_argument("--channels", default="0-7")
    parser.add_argument("--preset", default="native")
    parser.add_argument("--steps", type=int, help="default: the preset's")
    parser.add_argument("--parameterizations", default="pixel,fourier,maco")
    parser.add_argument("--maco-learning-rates", default="",
                        help="extra MACO runs at these Adam learning rates, e.g. '0.2'")
    parser.add_argument("--maco-contrasts", default="",
                        help="extra MACO runs at these contrasts (Config.maco_contrast), e.g. '3,6'")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, params = zoo.load(args.model)
    channels = pipeline.parse_channels(args.channels, model.num_channels(params, args.layer), args.layer)
    base = maximization.preset(args.preset, **({} if args.steps is None else {"steps": args.steps}))
    shape = tuple(base.shape or model.input_shape)
    runs = [(name, maximization.preset(base, parameterization=name)) for name in args.parameterizations.split(",")]
    runs += [(f"maco lr={lr}", maximization.preset(base, parameterization="maco", learning_rate=float(lr)))
             for lr in filter(None, args.maco_learning_rates.split(","))]
    runs += [(f"maco contrast={c}", maximization.preset(base, parameterization="maco", maco_contrast=float(c)))
             for c in filter(None, args.maco_contrasts.split(","))]

    law = maximization.parameterization_of(maximization.preset(base, parameterization="maco"))
    starts = jax.vmap(lambda k: law.to_video(law.init(k, shape)))(jax.random.split(jax.random.PRNGKey(1), 8))
    law_spatial, law_temporal = spectrum.power_slopes(np.asarray(maximization.minmax_normalize(starts)))
    a, b = base.maco_exponents
    report = {
        "model": args.model, "layer": args.layer, "channels": [int(c) for c in channels], "shape": shape,
        "steps": base.steps, "preset": args.preset, "device": str(jax.devices()[0]),
        "law": {"exponents": [a, b], "nominal_slopes": [-2 * a, -2 * b],
                "random_phase_slopes": [float(law_spatial.mean()), float(law_temporal.mean())]},
        "runs": {},
    }
    for name, config in runs:
        start = time.perf_counter()
        result = maximization.maximize(model, params, args.layer, channels, config=config,
                                       key=jax.random.PRNGKey(args.seed))
        seconds = time.perf_counter() - start
        spatial, temporal = spectrum.power_slopes(np.asarray(result.videos))
        report["runs"][name] = {
            "objective": np.asarray(result.objective).round(5).tolist(),
            "mean_objective": float(np.mean(result.objective)),
            "spatial_slope": float(spatial.mean()), "spatial_slope_sd": float(spatial.std()),
            "temporal_slope": float(temporal.mean()), "temporal_slope_sd": float(temporal.std()),
            "seconds": round(seconds, 1),
        }
        print(name, json.dumps(report["runs"][name]), flush=True)
    if "pixel" in report["runs"]:
        # Channels that no parameterization activates have objectives near 0 or below, where a
        # per-channel ratio means nothing: the ratio of mean objectives, and the mean per-channel
        # ratio over the channels pixel activates.
        pixel = np.asarray(report["runs"]["pixel"]["objective"])
        alive = pixel > 0
        report["channels_pixel_activates"] = int(alive.sum())
        for run in report["runs"].values():
            objective = np.asarray(run["objective"])
            run["ratio_of_means_to_pixel"] = float(objective.mean() / pixel.mean())
            run["mean_ratio_to_pixel_where_active"] = float(np.mean(objective[alive] / pixel[alive]))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
