"""The ``kv3d`` command line. Each subcommand is one ``_add_<name>(subparsers)`` function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import flax
import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np

import converters
from kv3d_jax import agreement, models, parameterizations, params_io, pipeline, tuning, writers
from kv3d_jax.decompose import decompose
from kv3d_jax.maximize import PRESETS, maximize, parse_channels
from kv3d_jax.models import motionnet
from kv3d_jax.motion import motion_summary
from kv3d_jax.progress import ProgressBar
from kv3d_jax.refine import DEFAULT_STEPS as REFINE_STEPS, MOTIONS, Config as RefineConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kv3d", description="Visualise what the kernels of a 3D CNN have learned."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kv3d`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError) as err:
        print(f"kv3d {args.command}: error: {err}", file=sys.stderr)
        return 2


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a PyTorch or Caffe2 checkpoint into a kv3d params file",
        description="Reads CHECKPOINT (PyTorch zip, legacy torch.save or Caffe2 pickle, "
        "detected from the file; no code in it is run), checks it holds exactly MODEL's "
        "tensors and writes them as a params file. Checkpoints: "
        + "; ".join(f"{name}: {what}" for name, what in converters.formats().items()),
    )
    p.add_argument("model", help=f"model name: {', '.join(converters.names())}")
    p.add_argument("checkpoint", help="the checkpoint file")
    p.add_argument("-o", "--output", required=True, help="params file to write (Flax msgpack)")
    p.set_defaults(run=_run_convert)


def _run_convert(args) -> int:
    params = converters.convert(args.model, args.checkpoint)
    params_io.save(args.output, params)
    leaves = jax.tree.leaves(params)
    fmt = converters.checkpoint.FORMATS[converters.checkpoint_format(args.checkpoint)]
    print(
        f"converted {args.checkpoint} ({fmt}) for {args.model}: {len(leaves)} tensors, "
        f"{sum(leaf.size for leaf in leaves):,} parameters -> {args.output}"
    )
    return 0


def _add_layers(sub) -> None:
    p = sub.add_parser("layers", help="list a model's layers (with channel counts given params)")
    p.add_argument("model", help=f"model name: {', '.join(models.names())}")
    p.add_argument("params", nargs="?", help="a params file from `kv3d convert`, to show channel counts")
    p.set_defaults(run=_run_layers)


def _run_layers(args) -> int:
    model = models.get(args.model)
    if args.params is None:
        print("\n".join(model.layers))
        return 0
    params = params_io.load(args.params)
    try:
        channels = [model.num_channels(params, layer) for layer in model.layers]
    except flax.errors.FlaxError as err:
        raise ValueError(f"{args.params} does not hold {args.model} params: {err}") from None
    width = max(map(len, model.layers))
    for layer, n in zip(model.layers, channels):
        print(f"{layer:<{width}}  {n} channels")
    return 0


def _add_maximize(sub) -> None:
    p = sub.add_parser(
        "maximize",
        help="stage 1: the video that maximally activates each channel of a layer",
        description="Optimises, for every chosen channel of LAYER at once, the video that most "
        "activates it, and writes {model}_{layer}_{channel}_stage1.gif per channel plus "
        "{model}_{layer}_stage1.npz (videos, objective, channels) for stage 2.",
    )
    p.add_argument("--model", default="c3d", help=f"model name: {', '.join(models.names())}")
    p.add_argument("--weights", help="params file made by `kv3d convert` (required)")
    p.add_argument("--layer", required=True, help="layer to tap; `kv3d layers MODEL` lists them")
    p.add_argument("--channels", default="all", help="'all' (default), a range '0-15' or a list '3,7,9'")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--preset", default="paper", help=f"one of: {', '.join(PRESETS)} (default paper)")
    p.add_argument("--steps", type=int, help="optimisation steps (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--objective", default="channel", choices=("channel", "neuron"),
                   help="channel: mean activation (default); neuron: the centre activation")
    p.add_argument("--rectify", action="store_true", help="maximise the activation after a ReLU")
    p.add_argument("--parameterization", default="pixel", choices=tuple(parameterizations.PARAMETERIZATIONS),
                   help="how the video is represented (default pixel)")
    p.add_argument("--batch-size", type=int,
                   help="kernels optimised together in one compiled batch (default: as many as fit in "
                   "70%% of the memory, from XLA's memory analysis)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype the model computes in (default float32; the optimised video stays float32)")
    p.add_argument("--coordinator", help="HOST:PORT of process 0, to split the channels over "
                   "--num-processes processes (jax.distributed); each writes only its own channels")
    p.add_argument("--num-processes", type=int, default=1, help="processes sharing the channels (default 1)")
    p.add_argument("--process-id", type=int, default=0, help="this process's index, 0 … num-processes − 1")
    p.set_defaults(run=_run_maximize)


def _run_maximize(args) -> int:
    if args.weights is None:
        raise ValueError(
            "maximize needs the model's weights: pass --weights PARAMS, a params file made from the "
            f"PyTorch checkpoint with `kv3d convert {args.model} CHECKPOINT -o PARAMS`"
        )
    model = models.get(args.model)
    model.check_layer(args.layer)
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    params = params_io.load(args.weights)
    channels = parse_channels(args.channels, model.num_channels(params, args.layer))
    bar = None

    def show(done, total, objective):
        nonlocal bar
        bar = bar or ProgressBar(total, label=f"{model.name} {args.layer}")
        bar.update(done, objective=objective)

    result = maximize(
        model, params, args.layer, channels, preset=args.preset, steps=args.steps,
        key=jax.random.PRNGKey(args.seed), objective=args.objective,
        parameterization=args.parameterization, rectify=args.rectify,
        batch_size=args.batch_size, callback=show, compute_dtype=jnp.dtype(args.dtype),
    )
    if bar is not None:
        bar.close()
    videos, objective = np.asarray(result.videos), np.asarray(result.objective)
    for channel, video in zip(result.channels, videos):
        writers.save_gif(f"{args.out}/{writers.kernel_stem(model.name, args.layer, int(channel))}_stage1.gif", video)
    part = f"_process{jax.process_index()}" if jax.process_count() > 1 else ""
    npz = writers.save_npz(
        f"{args.out}/{model.name}_{args.layer}_stage1{part}.npz", videos=videos, objective=objective,
        channels=result.channels, model=model.name, layer=args.layer,
    )
    print(f"{len(videos)} kernels of {model.name} {args.layer}: mean objective {objective.mean():.4g}; "
          f"GIFs and {npz.name} in {args.out}")
    return 0


def _add_tuning(sub) -> None:
    p = sub.add_parser(
        "tuning",
        help="direction tuning of every channel of a layer, measured with drifting gratings",
        description="Shows every channel of LAYER full-contrast sinusoidal gratings drifting in "
        "--directions evenly spaced directions at each --sf and --tf, and reports per channel the "
        "preferred direction (0° right, 90° up) and the direction-selectivity index "
        "DSI = (R_pref - R_null) / (R_pref + R_null) at its best SF and TF. Writes "
        "{model}_{layer}_tuning.png (polar plots) and {model}_{layer}_tuning.npz.",
    )
    p.add_argument("--model", default="motionnet", help=f"model name: {', '.join(models.names())}")
    p.add_argument("--weights", help="params file made by `kv3d convert` (default for motionnet: the shipped one)")
    p.add_argument("--layer", required=True, help="layer to tap; `kv3d layers MODEL` lists them")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--directions", type=int, default=16, help="number of directions, even (default 16)")
    p.add_argument("--sf", type=float, nargs="+", default=[0.05, 0.1, 0.2],
                   help="spatial frequencies, cycles/px (default 0.05 0.1 0.2)")
    p.add_argument("--tf", type=float, nargs="+", default=[0.05, 0.1, 0.2],
                   help="temporal frequencies, cycles/frame (default 0.05 0.1 0.2)")
    p.add_argument("--phases", type=int, default=4, help="grating phases averaged (default 4)")
    p.set_defaults(run=_run_tuning)


def _run_tuning(args) -> int:
    model = models.get(args.model)
    model.check_layer(args.layer)
    if args.weights is not None:
        params = params_io.load(args.weights)
    elif args.model == "motionnet":
        params = motionnet.load_default()[1]
    else:
        raise ValueError(
            f"tuning needs {args.model}'s weights: pass --weights PARAMS, a params file made from the "
            f"PyTorch checkpoint with `kv3d convert {args.model} CHECKPOINT -o PARAMS`"
        )
    if args.directions < 2 or args.directions % 2:
        raise ValueError(f"--directions must be even and >= 2 so each has its opposite, got {args.directions}")
    directions = np.arange(args.directions) * 360.0 / args.directions
    responses = tuning.grating_responses(
        model, params, args.layer, directions, args.sf, args.tf, num_phases=args.phases
    )
    result = tuning.direction_tuning(responses, directions)
    stem = f"{args.out}/{model.name}_{args.layer}"
    png = tuning.polar_plot(f"{stem}_tuning.png", result, directions, title=f"{model.name} {args.layer}")
    writers.save_npz(
        f"{stem}_tuning.npz", responses=responses, directions=directions, spatial_freqs=np.asarray(args.sf),
        temporal_freqs=np.asarray(args.tf), preferred_deg=result.preferred_deg, dsi=result.dsi,
    )
    print("channel  preferred_deg    DSI  best_sf  best_tf")
    for c, (pref, dsi, s, f) in enumerate(zip(result.preferred_deg, result.dsi, result.best_sf, result.best_tf)):
        mark = "  DS" if dsi >= tuning.DS_THRESHOLD else ""
        print(f"{c:7d}  {pref:13.1f}  {dsi:5.2f}  {args.sf[s]:7.3g}  {args.tf[f]:7.3g}{mark}")
    selective = result.dsi >= tuning.DS_THRESHOLD
    print(f"{selective.sum()} of {len(selective)} channels of {model.name} {args.layer} are direction-selective "
          f"(DSI >= {tuning.DS_THRESHOLD}); polar plots in {png}")
    return 0


_OUTPUT_KINDS = tuple(f"_{kind}" for kind in writers.DECOMPOSITION_FILES if kind != "stage1")


def _read_gif(path) -> np.ndarray:
    """A GIF as ``(T, H, W, 3)`` float32 in [0, 1] (grey repeated to RGB, alpha dropped)."""
    frames = np.asarray(iio.imread(path, index=None))
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.ndim != 4:
        raise ValueError(f"{path} is not an animated image: got pixel array of shape {frames.shape}")
    frames = frames[..., :3] if frames.shape[-1] >= 3 else np.repeat(frames[..., :1], 3, axis=-1)
    return frames.astype(np.float32) / 255.0


def _decompose_inputs(path: str) -> list[tuple[str, np.ndarray]]:
    """``(stem, video)`` pairs from a GIF, a folder of GIFs or a stage-1 ``.npz`` (key ``videos``)."""
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if source.suffix == ".npz":
        with np.load(source) as data:
            if "videos" not in data:
                raise ValueError(f"{path} has no 'videos' array (K, T, H, W, 3); `kv3d maximize` writes one")
            videos = np.asarray(data["videos"], np.float32)
            if {"model", "layer", "channels"} <= set(data.files):
                stems = [writers.kernel_stem(str(data["model"]), str(data["layer"]), int(c)) for c in data["channels"]]
            else:
                stems = [f"{source.stem}_{k}" for k in range(len(videos))]
        return list(zip(stems, videos))
    if source.is_dir():
        gifs = sorted(p for p in source.glob("*.gif") if not p.stem.endswith(_OUTPUT_KINDS))
        if not gifs:
            raise ValueError(f"{path} holds no GIFs to decompose (outputs of `kv3d decompose` are skipped)")
    elif source.suffix.lower() == ".gif":
        gifs = [source]
    else:
        raise ValueError(f"{path} is neither a GIF, a folder of GIFs nor an .npz of stage-1 videos")
    return [(p.stem.removesuffix("_stage1"), _read_gif(p)) for p in gifs]


def _add_decompose(sub) -> None:
    p = sub.add_parser(
        "decompose",
        help="stage 2: split videos into a static texture and a motion field",
        description="Decomposes each video into a static texture seen through a displacement field "
        "(SPEC §3) and writes, per video, {stem}_stage1.gif, _static.png, _deform.gif, _motion.gif, "
        "_recon.gif and _panel.gif; prints each video's dominant direction (degrees, 0 = right, "
        "90 = up), mean speed (px/frame) and reconstruction PSNR.",
    )
    p.add_argument("source", help="a GIF, a folder of GIFs, or a stage-1 .npz with a 'videos' array")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=2000, help="optimisation steps (default 2000)")
    p.set_defaults(run=_run_decompose)


def _run_decompose(args) -> int:
    inputs = _decompose_inputs(args.source)
    groups: dict[tuple, list[tuple[str, np.ndarray]]] = {}
    for stem, video in inputs:
        groups.setdefault(video.shape, []).append((stem, video))
    for shape, items in groups.items():
        stems, videos = zip(*items)
        videos = np.stack(videos)
        bar = ProgressBar(args.steps, label=f"decompose {len(videos)}x{'x'.join(map(str, shape[:3]))}")
        result = decompose(videos, steps=args.steps, progress=lambda done, total: bar.update(done))
        bar.close()
        summary = motion_summary(result)
        for k, stem in enumerate(stems):
            writers.save_decomposition(args.out, stem, videos[k], result.static[k], result.displacement[k],
                                       result.reconstruction[k], valid=np.asarray(summary.weight[k]) > 0)
            print(f"{stem}: direction {float(summary.direction_deg[k]):5.1f} deg, speed "
                  f"{float(summary.speed[k]):.3f} px/frame, PSNR {float(summary.psnr[k]):.1f} dB")
    print(f"{len(inputs)} videos decomposed; files in {args.out}")
    return 0


def _add_visualize(sub) -> None:
    job = pipeline.DEFAULT_JOB
    p = sub.add_parser(
        "visualize",
        help="stage 1 + stage 2 for every channel of some layers, resumable, with an HTML gallery",
        description="For every chosen channel of each layer: the video that maximally activates it "
        "(stage 1), its split into a static texture and motion (stage 2) and their pictures, stored "
        "per kernel in --out so that an interrupted run resumes where it stopped; then an HTML "
        f"gallery (OUT/index.html). With no options: every channel of {job['model']}'s (embedded, no "
        f"weights needed) layers {', '.join(job['layers'])} at the {job['preset']} preset with "
        f"{job['steps']} + {job['decompose_steps']} steps, a few minutes on a CPU.",
    )
    p.add_argument("--model", help=f"model name (default {job['model']}): {', '.join(models.names())}")
    p.add_argument("--weights", help=f"params file from `kv3d convert`, or the checkpoint itself "
                   f"(not needed for {job['model']})")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--layer", action="append", help="a layer to visualise (repeatable); "
                       "`kv3d layers MODEL` lists them")
    which.add_argument("--layers", choices=("all",), help="all: every layer of the model")
    p.add_argument("--channels", default="all", help="'all' (default), a range '0-15' or a list '3,7,9'")
    p.add_argument("--out", default=job["out"], help=f"run folder (default {job['out']}); "
                   "rerun with the same settings to resume")
    p.add_argument("--preset", choices=tuple(PRESETS), help=f"stage-1 preset (default {job['preset']} for "
                   f"{job['model']}, {pipeline.OTHER_MODELS['preset']} for other models)")
    p.add_argument("--steps", type=int, help=f"stage-1 steps (default {job['steps']} for {job['model']} at "
                   f"{job['preset']}, else the preset's)")
    p.add_argument("--decompose-steps", type=int, help=f"stage-2 steps (default {job['decompose_steps']} "
                   f"for {job['model']}, else {pipeline.OTHER_MODELS['decompose_steps']})")
    p.add_argument("--chunk", type=int, default=job["chunk"], help=f"kernels computed together (default "
                   f"{job['chunk']}); results do not depend on it")
    p.add_argument("--seed", type=int, default=job["seed"], help=f"random seed (default {job['seed']})")
    p.add_argument("--rectify", action="store_true", help="maximise each channel after a ReLU (for layers "
                   "whose output is linear in the input, whose optimum is otherwise a flat colour)")
    p.add_argument("--refine", type=int, nargs="?", const=REFINE_STEPS, default=0, metavar="STEPS",
                   help="add stage 3: maximise each kernel over the static and displacement of its decomposition "
                   f"for STEPS steps (default {REFINE_STEPS}); files *_refined_{{video,static,motion,deform}} "
                   "beside the stage-2 ones")
    p.add_argument("--refine-motion", choices=tuple(MOTIONS), default=RefineConfig.motion,
                   help=f"what stage 3's motion may be: constant (each pixel at a constant velocity, as in a "
                   f"drifting grating) or free (any displacement per frame); default {RefineConfig.motion}")
    p.set_defaults(run=_run_visualize)


def _run_visualize(args) -> int:
    settings = pipeline.job_settings(args.model, args.preset, args.steps, args.decompose_steps, args.seed,
                                     args.rectify, args.refine, args.refine_motion)
    model = models.get(settings.model)
    layers = pipeline.job_layers(model, args.layer, every=args.layers == "all")
    model, params = pipeline.load_model(settings.model, args.weights)
    index = pipeline.visualize(model, params, layers, args.channels, args.out, settings, args.chunk)
    print(f"results: {index.resolve()}")
    return 0


def _add_agreement(sub) -> None:
    job = pipeline.DEFAULT_JOB
    p = sub.add_parser(
        "agreement",
        help="grating-preferred vs stage-2 direction of the direction-selective channels of a run",
        description="For each layer of a `kv3d visualize` run folder: every direction-selective "
        f"channel's (DSI >= {tuning.DS_THRESHOLD}) preferred drifting-grating direction beside the "
        "dominant direction of its stage-2 motion (or, with --stage refined, of its refinement's), and "
        "the median angular difference. Writes OUT/agreement.md (OUT/agreement_refined.md).",
    )
    p.add_argument("--out", default=job["out"], help=f"the run folder (default {job['out']})")
    p.add_argument("--weights", help=f"the run's params file or checkpoint (not needed for {job['model']})")
    p.add_argument("--layer", action="append", help="only this layer (repeatable)")
    p.add_argument("--stage", default="stage2", choices=tuple(agreement.STAGES),
                   help="whose motion to compare: stage2 (default) or refined (a run made with --refine)")
    p.set_defaults(run=_run_agreement)


def _run_agreement(args) -> int:
    rows, medians, compared = agreement.report(args.out, args.weights, args.layer, args.stage)
    if not compared:
        raise ValueError(f"{args.out} holds no finished kernels yet; run `kv3d visualize --out {args.out}` first")
    table = agreement.markdown(rows, medians, args.stage)
    name = "agreement.md" if args.stage == "stage2" else f"agreement_{args.stage}.md"
    writers.save_text(f"{args.out}/{name}", table)
    print(table, end="")
    print(f"{len(rows)} of {compared} kernels are direction-selective; table in {args.out}/{name}")
    return 0


_SUBCOMMANDS: list = [_add_convert, _add_layers, _add_maximize, _add_tuning, _add_decompose, _add_visualize,
                      _add_agreement]

if __name__ == "__main__":
    sys.exit(main())
