"""Compares stage 1's parameterizations through the whole `kv3d visualize` job (docs/parameterizations.md).

For each parameterization the same kernels (model, layers, channels, preset, steps, seed) are swept
by :func:`kv3d_jax.pipeline.visualize` into ``OUT/{parameterization}``; the script then reads the
kernel records and prints, per layer and parameterization, the mean objective and its ratio to
pixel's (per channel, over the channels pixel activates), the share of reliable kernels and the
optimal videos' spatial and temporal power-spectrum slopes (:func:`kv3d_jax.spectrum.power_slopes`)
beside the natural-video law's nominal ones, as a Markdown table. It also writes
``OUT/{layer}_side_by_side.png``: one row per channel, one column per parameterization (the middle
frame of the optimal video) and, for MACO, that frame seen through its attribution map.

    .venv/bin/python scripts/compare_parameterizations.py --model motionnet --layers conv2,conv4 \
        --channels 0-7 --out /tmp/params-motionnet
    .venv/bin/python scripts/compare_parameterizations.py --model inception_i3d \
        --layers Conv3d_2c_3x3,Mixed_4b --channels 0-3 --steps 40 --decompose-steps 100 --out /tmp/params-i3d
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from kv3d_jax import pipeline, render, spectrum, writers, zoo
from kv3d_jax.job import Job

GAP = 2


def _records(out: Path, layer: str) -> dict[int, dict]:
    return {int(p.stem): dict(np.load(p)) for p in sorted((out / "kernels" / layer).glob("[0-9]*.npz"))}


def _sheet(columns: list[list[np.ndarray]]) -> np.ndarray:
    """Frames ``(H, W, 3)`` laid out as columns of rows with white gaps, each enlarged by a whole factor to at
    least 128 px high."""
    scale = max(1, -(-128 // columns[0][0].shape[0]))  # frames enlarged to at least 128 px, pixels kept square
    columns = [[np.repeat(np.repeat(frame, scale, axis=0), scale, axis=1) for frame in column] for column in columns]
    h, w, _ = columns[0][0].shape
    sheet = np.ones((len(columns[0]) * (h + GAP), len(columns) * (w + GAP), 3), np.float32)
    for j, column in enumerate(columns):
        for i, frame in enumerate(column):
            sheet[i * (h + GAP):i * (h + GAP) + h, j * (w + GAP):j * (w + GAP) + w] = frame
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="motionnet")
    parser.add_argument("--layers", default="conv2,conv4")
    parser.add_argument("--channels", default="0-7")
    parser.add_argument("--preset", default="native")
    parser.add_argument("--steps", type=int, default=None, help="default: the job's for the model")
    parser.add_argument("--decompose-steps", type=int, default=None)
    parser.add_argument("--parameterizations", default="pixel,fourier,maco")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()

    model, params = zoo.load(args.model)
    layers = args.layers.split(",")
    names = args.parameterizations.split(",")
    seconds = {}
    for name in names:
        job = Job.create(args.model, args.preset, args.steps, args.decompose_steps, parameterization=name)
        start = time.perf_counter()
        pipeline.visualize(model, params, job, layers, args.channels, args.out / name, log=lambda line: None)
        seconds[name] = time.perf_counter() - start
    print(f"{args.model}, preset {args.preset}, steps {job.steps}, decomposition steps {job.decompose_steps}, "
          f"channels {args.channels}; law slopes -2, -2\n")
    print("| layer | parameterization | mean objective | ÷ pixel (per channel) | reliable | spatial slope "
          "| temporal slope | seconds (all layers) |")
    print("|---|---|---|---|---|---|---|---|")
    for layer in layers:
        records = {name: _records(args.out / name, layer) for name in names}
        channels = sorted(records[names[0]])
        pixel = np.array([records["pixel"][c]["objective"] for c in channels]) if "pixel" in records else None
        columns = []
        for name in names:
            objective = np.array([records[name][c]["objective"] for c in channels], np.float64)
            videos = np.stack([records[name][c]["video"].astype(np.float32) for c in channels])
            spatial, temporal = spectrum.power_slopes(videos)
            active = pixel > 0 if pixel is not None else np.zeros(len(channels), bool)
            ratio = float(np.mean(objective[active] / pixel[active])) if active.any() else float("nan")
            reliable = np.mean([bool(records[name][c]["reliable"]) for c in channels])
            print(f"| {layer} | {name} | {objective.mean():.3g} | {ratio:.2f} | {reliable:.0%} | "
                  f"{spatial.mean():.2f} ± {spatial.std():.2f} | {temporal.mean():.2f} ± {temporal.std():.2f} | "
                  f"{seconds[name]:.0f} |")
            middle = videos.shape[1] // 2
            columns.append([v[middle] for v in videos])
            if "attribution" in records[name][channels[0]]:
                columns.append([render.transparency(v, records[name][c]["attribution"])[middle]
                                for c, v in zip(channels, videos)])
        writers.save_png(args.out / f"{layer}_side_by_side.png", _sheet(columns))


if __name__ == "__main__":
    main()
