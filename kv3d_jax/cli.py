"""The ``kv3d`` command line. Each subcommand is one ``_add_<name>(subparsers)`` function.

Every failure is one line ``kv3d <command>: error: ...`` on stderr and a non-zero exit
status (2 for a bad command line or input, 1 for anything else, 130 when interrupted);
no traceback is printed, control characters are escaped, and no Python warning precedes it
(warnings are printed as ``kv3d <command>: warning: ...`` lines once a command succeeds).
"""

from __future__ import annotations

import argparse
import errno
import itertools
import math
import mmap
import os
import struct
import sys
import warnings
import zipfile
from pathlib import Path

import flax
import imageio_ffmpeg
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

import converters
from kv3d_jax import agreement, decomposition, distribute, diversity, maximization, models, parameterizations
from kv3d_jax import params_io, pipeline
from kv3d_jax import gallery, job, runner, slowfast, spectrum, transforms, tuning, writers, zoo
from kv3d_jax.decomposition import decompose
from kv3d_jax.maximization import PRESETS, maximize
from kv3d_jax.motion import motion_summary
from kv3d_jax.progress import ProgressBar
from kv3d_jax.record import MEDIA
from kv3d_jax.refinement import DEFAULT_STEPS as REFINE_STEPS, MOTIONS, Config as RefineConfig
from kv3d_jax.store import Store, params_checksum
from kv3d_jax.untrusted import escape, output_path, printable, quote, regular_file

# The rule for --model in every subcommand that takes it: the model whose weights ship with kv3d.
DEFAULT_MODEL = job.DEFAULT_MODEL
_DEFAULTS = job.DEFAULTS[job.DEFAULT_MODEL]
_MODEL_HELP = (f"model name (default {DEFAULT_MODEL}, whose weights ship with kv3d; every other model needs "
               f"--weights): {', '.join(models.names())}")
# The most pixels (frames x height x width) `kv3d decompose` reads from one input video, the most
# frames of one video, and the most pixels of all its inputs together.
MAX_VIDEO_PIXELS = 2**22
MAX_VIDEO_FRAMES = 1024
MAX_TOTAL_PIXELS = 2**24
MAX_GIFS = 4096
# `kv3d maximize --diversity` and `kv3d visualize --diversity`: the most optima per channel (each kernel
# holds all N videos in one batch).
MAX_DIVERSITY = job.MAX_DIVERSITY
# GIF data blocks `kv3d decompose` walks through to count a GIF's frames (Pillow writes 255-byte
# blocks: a GIF inside the pixel budget has a few tens of thousands).
_MAX_GIF_BLOCKS = 2**20
# A stage-1 .npz holds five arrays; its zip directory is a few hundred bytes.
_MAX_NPZ_MEMBERS, _MAX_NPZ_DIRECTORY = 64, 1 << 16
# `kv3d tuning`: the most directions, phases and gratings (directions x SFs x TFs x phases) it shows.
MAX_DIRECTIONS, MAX_PHASES, MAX_GRATINGS = 360, 64, 20_000
# `kv3d tuning --slowfast`: stage-1 steps per penalty weight by default (measured in docs/slowfast.md).
SLOWFAST_STEPS = 400
# --memory-budget: the most GiB per device kv3d accepts (a petabyte).
_MAX_MEMORY_GIB = 2.0**20


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``{prog}: error: {message}``, exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {printable(message, 500)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kv3d", description="Visualise what the kernels of a 3D CNN have learned.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def _one_line(err: BaseException) -> str:
    """What went wrong, on one line."""
    if isinstance(err, MemoryError):
        text = "out of memory" + (f": {err}" if str(err) else "")
    elif isinstance(err, RecursionError):
        text = f"input nested too deeply to process ({err})"
    elif isinstance(err, OSError) and err.strerror:
        where = f": {err.filename}" if err.filename else ""
        hint = "; free some space and rerun (finished work is kept)" if err.errno == errno.ENOSPC else ""
        text = f"{err.strerror}{where}{hint}"
    elif isinstance(err, OverflowError):
        text = f"a number is too large to use ({err})"
    elif isinstance(err, (ValueError, OSError, zipfile.BadZipFile, distribute.ProcessLost)):
        text = str(err) or type(err).__name__
    else:
        text = f"kv3d failed unexpectedly ({err or 'no message'}); please report this"
    return printable(" ".join(line.strip() for line in text.splitlines() if line.strip()), 2000)


def _cache_compiled_programs() -> None:
    """Turns on JAX's persistent compilation cache, so that running a job again reads its compiled
    programs back; a cache folder that cannot be made is reported, and the run compiles instead.
    ``JAX_ENABLE_COMPILATION_CACHE=false`` turns the cache off (JAX's own switch)."""
    try:
        runner.enable_compilation_cache()
    except OSError as err:
        print(f"kv3d: warning: no compilation cache ({_one_line(err)}); set KV3D_CACHE to a writable "
              "folder to keep compiled programs between runs", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kv3d`` console script; returns the exit status.

    Python warnings raised while the command runs are held back: printed, one line each, after a
    command that succeeds, and dropped when it fails, so that a failure is exactly one line.
    """
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            _cache_compiled_programs()
            status = args.run(args) or 0
        except KeyboardInterrupt:
            print(f"kv3d {args.command}: error: interrupted; finished work is kept", file=sys.stderr)
            return _leave(130)
        except Exception as err:  # noqa: BLE001 - every failure is reported as one line, never a traceback
            print(f"kv3d {args.command}: error: {_one_line(err)}", file=sys.stderr)
            return _leave(2 if isinstance(err, (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
                                                OverflowError)) else 1)
    for warning in caught:
        message = " ".join(str(warning.message).split())
        print(f"kv3d {args.command}: warning: {printable(message, 1000)}", file=sys.stderr)
    return status


def _leave(status: int) -> int:
    """``status``, or, in a failed process of a ``jax.distributed`` run, the process's end with it at
    once: JAX's shutdown at exit would wait for the heartbeats of the processes that are gone
    (100 s) and then abort with a stack dump, which is not a one-line failure."""
    if jax.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _seed(text: str) -> int:
    """``--seed``: an integer from 0 to 2**63 - 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text[:40]!r}: write a whole number") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"seed {text[:40]} is out of range: choose one from 0 to {2**63 - 1}")
    return value


def _at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text[:40]!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _penalty_weight(text: str) -> float:
    """``--slowfast LAMBDA``: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid penalty weight {text[:40]!r}: write a number such as 3") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"the penalty weight must be a finite number of at least 0, got {text[:40]}")
    return value


def _optima_count(text: str) -> int:
    """``kv3d visualize --diversity N``: 0 (off) or an integer from 2 to :data:`MAX_DIVERSITY`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of optima {text[:40]!r}: write a whole number") from None
    if value != 0 and not 2 <= value <= MAX_DIVERSITY:
        raise argparse.ArgumentTypeError(f"takes 2 to {MAX_DIVERSITY} optima per channel (0: none), got {text[:40]}")
    return value


def _output_file(path: str) -> Path:
    """``path`` as a file to write: refused if it names a folder or lies under a file."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"{path} is a folder; name the file to write, e.g. {out / 'params.msgpack'}")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"cannot write {path}: {parent} is a file, not a folder")
    return out


def _output_folder(path: str) -> Path:
    """``path`` as a folder to write into: refused if it or a folder above it is a file."""
    out = Path(path)
    for folder in (out, *out.parents):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"cannot write into {path}: {folder} is a file, not a folder")
    return out


def _load(model: str, weights: str | None):
    """``zoo.load(model, weights)``, saying which flag to pass when weights are needed."""
    if weights is None and models.entry(model).embedded is None:
        raise ValueError(
            f"{model} needs --weights PARAMS: its checkpoint ({converters.converter(model).CHECKPOINT}), or a params "
            f"file made from it with `kv3d convert {model} CHECKPOINT -o PARAMS`")
    return zoo.load(model, weights)


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
    p.add_argument("-o", "--output", required=True, help="params file to write (Flax msgpack); it also "
                   "records the model and its hyper-parameters, e.g. VideoGPT's downsample")
    p.add_argument("--bn-eps", type=float, metavar="EPS",
                   help="inception_i3d only: the BatchNorm epsilon the weights were trained with, which the "
                   "file does not record (default 1e-3, DeepMind's and piergiaj's; 1e-5 for the "
                   "i3d_pretrained_400.pt FVD implementations use); recorded in the params file")
    p.set_defaults(run=_run_convert)


def _run_convert(args) -> int:
    output = _output_file(args.output)
    overrides = {}
    if args.bn_eps is not None:
        if "bn_eps" not in dict(models.get(args.model).config):
            raise ValueError(f"--bn-eps is a setting of inception_i3d, not of {args.model}")
        overrides["bn_eps"] = args.bn_eps
    params, config = converters.convert(args.model, args.checkpoint, overrides)
    params_io.save(output, params, args.model, config)
    leaves = jax.tree.leaves(params)
    fmt = converters.checkpoint.FORMATS[converters.checkpoint_format(args.checkpoint)]
    described = f" ({', '.join(f'{k}={v}' for k, v in config.items())})" if config else ""
    print(
        f"converted {args.checkpoint} ({fmt}) for {args.model}{described}: {len(leaves)} tensors, "
        f"{sum(leaf.size for leaf in leaves):,} parameters -> {args.output}"
    )
    return 0


def _add_layers(sub) -> None:
    p = sub.add_parser("layers", help="list a model's layers with their channel counts")
    p.add_argument("model", help=f"model name: {', '.join(models.names())}")
    p.add_argument("params", nargs="?", help="a params file from `kv3d convert` or the checkpoint, to show "
                   "the layers and channels of the architecture it describes (default: the model's default one)")
    p.set_defaults(run=_run_layers)


def _run_layers(args) -> int:
    if args.params is None:
        # The default architecture's channel counts, from the shapes of its variables alone.
        model = models.get(args.model)
        params = jax.eval_shape(lambda key: models.init_params(args.model, key), jax.random.key(0))
        channels = model.layer_channels(params)
    else:
        try:
            model, params = zoo.load(args.model, args.params)
            channels = model.layer_channels(params)
        except (flax.errors.FlaxError, params_io.ParamsFileError) as err:
            raise ValueError(f"{args.params} does not hold {args.model} params: {err}") from None
    width = max(map(len, model.layers))
    for layer, n in channels.items():
        named = " (named: --channels takes their names)" if model.names_of(layer) else ""
        print(f"{layer:<{width}}  {n} channels{named}")
    return 0


def _add_maximize(sub) -> None:
    p = sub.add_parser(
        "maximize",
        help="stage 1: the video that maximally activates each channel of a layer",
        description="Optimises, for every chosen channel of LAYER at once, the video that most "
        "activates it, and writes {model}_{layer}_{channel}_stage1.gif (or --media's format) per channel plus "
        "{model}_{layer}_stage1.npz (videos, objective, channels) for stage 2.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=_MODEL_HELP)
    p.add_argument("--weights", help="params file made by `kv3d convert`, or the checkpoint itself "
                   f"(not needed for {DEFAULT_MODEL})")
    p.add_argument("--layer", required=True, help="layer to tap; `kv3d layers MODEL` lists them")
    p.add_argument("--channels", default="all", help="'all' (default), a range '0-15' or a list '3,7,9'; "
                   "channels with names (inception_i3d's Logits: Kinetics classes) also by name, "
                   "'playing cricket,juggling balls'")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--preset", default="paper", help=f"one of: {', '.join(PRESETS)} (default paper)")
    p.add_argument("--steps", type=_at_least(1), help="optimisation steps (default: the preset's)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed, 0 to 2**63-1 (default 0)")
    p.add_argument("--objective", default="channel", choices=("channel", "neuron"),
                   help="channel: mean activation (default); neuron: the centre activation")
    p.add_argument("--rectify", action="store_true", help="maximise the activation after a ReLU")
    p.add_argument("--parameterization", default="pixel", choices=tuple(parameterizations.PARAMETERIZATIONS),
                   help="how the video is represented (default pixel); maco fixes the video's amplitude "
                   "spectrum and optimises its phase, and adds each kernel's attribution map to the .npz")
    p.add_argument("--magnitude-from", nargs="+", metavar="FILE",
                   help="with --parameterization maco: fix the amplitude spectrum to the mean of these clips' spectra "
                   "(GIFs, MP4s, WebMs, folders of GIFs or .npz files with 'videos' (K, T, H, W, 3) in [0, 1]), each "
                   "resized to the optimised clip's size; default: the natural-video law")
    p.add_argument("--maco-exponents", nargs=2, type=float, metavar=("A", "B"),
                   default=spectrum.NATURAL_EXPONENTS,
                   help="with --parameterization maco: exponents of the natural-video law 1/(f_s^A f_t^B), "
                   "spatial and temporal (default %(default)s)")
    p.add_argument("--maco-contrast", type=float, default=1.0, metavar="C",
                   help="with --parameterization maco: root mean square of the video before its colour transform "
                   "and sigmoid (default 1, MACO's; higher reaches higher objectives, docs/maco.md)")
    p.add_argument("--batch-size", type=int,
                   help="kernels optimised together in one compiled batch (default: as many as fit in "
                   "70%% of the memory, from XLA's memory analysis)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype the model computes in (default float32; the optimised video stays float32)")
    p.add_argument("--diversity", type=_at_least(2), metavar="N",
                   help=f"N distinct optima per channel (2 to {MAX_DIVERSITY}), pushed apart by a diversity term on "
                   "the layer's activations: writes {model}_{layer}_{channel}_stage1_div{i}.{media} for i = 0..N-1, "
                   "{model}_{layer}_stage1_div.npz (videos (K, N, T, H, W, 3), objective (K, N), cosine (K, N, N)) "
                   "and index.html, each channel's optima side by side; they need --steps of at least "
                   f"{job.DIVERSITY_STEPS} (the preset's default is more), the fewest at which MotionNet conv3's came "
                   "out distinct")
    p.add_argument("--diversity-weight", type=float, metavar="W",
                   help="with --diversity: weight of the penalty on pairs of optima whose activation patterns' cosine "
                   f"exceeds {diversity.DEFAULT_MARGIN:g}, in units of their mean objective, against the soft minimum "
                   f"of their objectives (default {diversity.DEFAULT_WEIGHT:g}, measured on MotionNet in "
                   "docs/diversity.md; 0: no diversity term)")
    p.add_argument("--media", choices=tuple(MEDIA), help="format of the moving pictures: "
                   f"{', '.join(MEDIA)} (default gif, which `kv3d decompose` reads; with --diversity {MEDIA[0]}, "
                   "which its index.html plays)")
    _add_processes(p)
    p.set_defaults(run=_run_maximize)


def _run_maximize(args) -> int:
    out = _output_folder(args.out)
    _start_processes(args)
    model, params = _load(args.model, args.weights)
    model.check_layer(args.layer)
    channels = pipeline.parse_channels(args.channels, model.num_channels(params, args.layer), args.layer,
                                       model.names_of(args.layer))
    bar = None

    def show(done, total, objective):
        nonlocal bar
        bar = bar or ProgressBar(total, label=f"{model.name} {args.layer}")
        bar.update(done, objective=objective)

    if not all(math.isfinite(e) and 0 <= e <= 4 for e in args.maco_exponents):
        raise ValueError(f"--maco-exponents takes two numbers from 0 to 4, got {quote(list(args.maco_exponents))}")
    if not (math.isfinite(args.maco_contrast) and 0 < args.maco_contrast <= 100):
        raise ValueError(f"--maco-contrast takes a number above 0 and at most 100, got {quote(args.maco_contrast)}")
    config = maximization.preset(args.preset, objective=args.objective, parameterization=args.parameterization,
                                 rectify=args.rectify, maco_exponents=tuple(args.maco_exponents),
                                 maco_contrast=args.maco_contrast,
                                 **({} if args.steps is None else {"steps": args.steps}))
    if args.magnitude_from:
        if args.parameterization != "maco":
            raise ValueError("--magnitude-from fixes the spectrum of --parameterization maco; add it")
        shape = tuple(config.shape or model.input_shape)
        config = maximization.preset(config, magnitude=_clip_magnitude(args.magnitude_from, shape))
    key = jax.random.PRNGKey(args.seed)
    if args.diversity is None and args.diversity_weight is not None:
        raise ValueError("--diversity-weight weighs the diversity term of --diversity N; add --diversity")
    if args.diversity is not None:
        return _run_diverse(args, out, model, params, channels, config, key, show, lambda: bar)
    result = maximize(model, params, args.layer, channels, config=config, key=key,
                      batch_size=args.batch_size, callback=show, compute_dtype=jnp.dtype(args.dtype))
    if bar is not None:
        bar.close()
    videos, objective = np.asarray(result.videos), np.asarray(result.objective)
    media = args.media or "gif"
    for channel, video in zip(result.channels, videos):
        writers.save_video(
            output_path(out, f"{writers.kernel_stem(model.name, args.layer, int(channel))}_stage1.{media}"), video)
    extra = {}
    if args.parameterization == "maco" and len(videos):
        targets = np.asarray(result.channels, np.int32)
        extra["attribution"] = np.asarray(maximization.attribution(
            model, params, args.layer, config, videos, targets, runner.kernel_keys(jax.random.fold_in(key, 1), targets),
            compute_dtype=jnp.dtype(args.dtype)))
    part = f"_process{jax.process_index()}" if jax.process_count() > 1 else ""
    npz = writers.save_npz(
        output_path(out, f"{model.name}_{args.layer}_stage1{part}.npz"), videos=videos, objective=objective,
        channels=result.channels, model=model.name, layer=args.layer, **extra,
    )
    print(f"{len(videos)} kernels of {model.name} {args.layer}: mean objective {objective.mean():.4g}; "
          f"{media.upper()}s and {npz.name} in {args.out}")
    return 0


def _run_diverse(args, out, model, params, channels, config, key, show, bar) -> int:
    """`kv3d maximize --diversity N`: N optima per channel (:func:`kv3d_jax.diversity.maximize_diverse`),
    one moving picture per optimum (``--media``, MP4 by default), one ``.npz`` (MACO attribution maps
    too, per optimum) and ``index.html`` showing each channel's optima side by side."""
    if args.diversity > MAX_DIVERSITY:
        raise ValueError(f"--diversity takes 2 to {MAX_DIVERSITY} optima per channel, got {args.diversity}")
    weight = diversity.DEFAULT_WEIGHT if args.diversity_weight is None else args.diversity_weight
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"--diversity-weight takes a finite number of at least 0, got {quote(weight)}")
    if config.steps < job.DIVERSITY_STEPS:
        warnings.warn(f"{config.steps} steps may leave the {args.diversity} optima of a channel alike: MotionNet "
                      f"conv3's came out distinct from {job.DIVERSITY_STEPS} (docs/diversity.md); raise --steps")
    result = diversity.maximize_diverse(model, params, args.layer, channels, args.diversity, config=config,
                                        weight=weight, key=key, batch_size=args.batch_size,
                                        callback=show, compute_dtype=jnp.dtype(args.dtype))
    if bar() is not None:
        bar().close()
    videos, objective = np.asarray(result.videos), np.asarray(result.objective)
    cosine = np.asarray(result.cosine)
    media = args.media or MEDIA[0]
    names = model.names_of(args.layer)
    views = []
    for channel, optima, values, cosines, failed in zip(result.channels, videos, objective, cosine, result.failed):
        stem = writers.kernel_stem(model.name, args.layer, int(channel))
        files = [writers.save_video(output_path(out, f"{stem}_stage1_div{i}.{media}"), video).name
                 for i, video in enumerate(optima)]
        views.append(gallery.DiverseView(
            channel=int(channel), objective=[float(x) for x in values],
            max_cosine=float(diversity.off_diagonal(cosines).max()), media=files, failed=bool(failed),
            name=names[int(channel)] if names else ""))
    extra = {}
    if args.parameterization == "maco" and len(videos):
        targets = np.repeat(np.asarray(result.channels, np.int32), args.diversity)
        optimum = np.arange(len(targets)) % args.diversity
        keys = runner.kernel_keys(jax.random.fold_in(key, 1), args.diversity * targets + optimum)
        maps = maximization.attribution(model, params, args.layer, config, videos.reshape(-1, *videos.shape[2:]),
                                        targets, keys, compute_dtype=jnp.dtype(args.dtype))
        extra["attribution"] = np.asarray(maps).reshape(*videos.shape[:2], *maps.shape[1:])
    part = f"_process{jax.process_index()}" if jax.process_count() > 1 else ""
    npz = writers.save_npz(
        output_path(out, f"{model.name}_{args.layer}_stage1_div{part}.npz"), videos=videos, objective=objective,
        cosine=cosine, channels=result.channels, model=model.name, layer=args.layer,
        diversity_weight=weight, **extra,
    )
    page = gallery.write_page(output_path(out, f"index{part}.html"), gallery.diversity_page(
        f"{model.name} {args.layer}: {args.diversity} diverse optima per channel", views,
        [f"stage 1 at the {args.preset} preset, {config.steps} steps, {args.parameterization} parameterization; "
         f"diversity weight {weight:g} on the {diversity.DEFAULT_PATTERN} activation pattern's cosines above "
         f"{diversity.DEFAULT_MARGIN:g}; data in {npz.name}"]))
    off = diversity.off_diagonal(cosine)
    print(f"{len(videos)} kernels x {args.diversity} optima of {model.name} {args.layer}: mean objective "
          f"{objective.mean():.4g}, mean pairwise cosine {off.mean() if off.size else float('nan'):.3g}; "
          f"{media.upper()}s, {npz.name} and {page.name} in {args.out}")
    return 0


def _clip_magnitude(paths: list[str], shape: tuple[int, int, int]) -> spectrum.Magnitude:
    """The mean amplitude spectrum (:func:`kv3d_jax.spectrum.from_clips`) of the clips in ``paths``, each
    read by the bounded readers of `kv3d decompose` (GIFs, MP4s, WebMs, folders of GIFs, stage-1 ``.npz``; at most
    :data:`MAX_TOTAL_PIXELS` pixels in all) and resized trilinearly to ``shape`` ``(T, H, W)``."""
    total, count, summed = 0, 0, 0.0
    for path in paths:
        for _, clip in _decompose_inputs(path):
            total += math.prod(clip.shape[:3])
            if total > MAX_TOTAL_PIXELS:
                raise ValueError(f"--magnitude-from clips hold more than {MAX_TOTAL_PIXELS:,} pixels in all; "
                                 "give fewer or smaller clips")
            if not (clip.min() >= 0 and clip.max() <= 1):
                raise ValueError(f"{path} holds values outside [0, 1]; --magnitude-from reads videos in [0, 1]")
            resized = transforms.apply(jnp.asarray(clip), transforms.resize_matrices(clip.shape[:3], shape))
            summed = summed + spectrum.from_clips(np.asarray(resized)[None], parameterizations.COLOR_DECORRELATION)
            count += 1
    return spectrum.Magnitude(summed / count)


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
    p.add_argument("--model", default=DEFAULT_MODEL, help=_MODEL_HELP)
    p.add_argument("--weights", help="params file made by `kv3d convert`, or the checkpoint itself "
                   f"(not needed for {DEFAULT_MODEL})")
    p.add_argument("--layer", required=True, help="layer to tap; `kv3d layers MODEL` lists them")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--directions", type=_at_least(2), default=16,
                   help=f"number of directions, even, at most {MAX_DIRECTIONS} (default 16)")
    p.add_argument("--sf", type=float, nargs="+", default=[0.05, 0.1, 0.2],
                   help="spatial frequencies, cycles/px (default 0.05 0.1 0.2)")
    p.add_argument("--tf", type=float, nargs="+", default=[0.05, 0.1, 0.2],
                   help="temporal frequencies, cycles/frame (default 0.05 0.1 0.2)")
    p.add_argument("--phases", type=_at_least(1), default=4,
                   help=f"grating phases averaged, at most {MAX_PHASES} (default 4)")
    p.add_argument("--slowfast", action="store_true",
                   help="also optimise each direction-selective channel under growing penalties on its video's "
                   "temporal variation (Feichtenhofer et al.) and print its slow/fast index (the fraction of "
                   "its objective kept under the strongest penalty; high = slow) beside its grating-preferred TF "
                   "(at its preferred direction, on a finer grid of gratings), whether the two agree in sign (fast = "
                   "index below the median = preferred TF above the median) and the share that agree")
    p.add_argument("--slowfast-steps", type=_at_least(1), default=SLOWFAST_STEPS,
                   help=f"stage-1 steps per penalty weight, native preset (default {SLOWFAST_STEPS})")
    p.add_argument("--slowfast-weights", type=float, nargs="+", default=list(slowfast.WEIGHTS), metavar="WEIGHT",
                   help="penalty weights, 1/TV units, from 0 and increasing (default "
                   f"{' '.join(map(str, slowfast.WEIGHTS))})")
    p.set_defaults(run=_run_tuning)


def _run_tuning(args) -> int:
    out = _output_folder(args.out)
    if args.directions > MAX_DIRECTIONS or args.directions % 2:
        raise ValueError(f"--directions must be even, from 2 to {MAX_DIRECTIONS}, so each has its opposite, got "
                         f"{args.directions}")
    if args.phases > MAX_PHASES:
        raise ValueError(f"--phases must be from 1 to {MAX_PHASES}, got {args.phases}")
    for flag, values in (("--sf", args.sf), ("--tf", args.tf)):
        if not all(math.isfinite(v) and -1 <= v <= 1 for v in values):
            raise ValueError(f"{flag} takes frequencies from -1 to 1 cycles per px or frame, got "
                             f"{quote(list(values))}")
    if args.slowfast:
        weights = args.slowfast_weights
        if (len(weights) < 2 or weights[0] != 0 or not all(math.isfinite(w) for w in weights)
                or any(b <= a for a, b in zip(weights, weights[1:]))):
            raise ValueError(f"--slowfast-weights must start at 0 and increase, at least two of them, got "
                             f"{quote(list(weights))}")
    gratings = args.directions * len(args.sf) * len(args.tf) * args.phases
    if gratings > MAX_GRATINGS:
        raise ValueError(f"{gratings:,} gratings (directions x --sf x --tf x phases) are more than the "
                         f"{MAX_GRATINGS:,} kv3d tuning shows; use fewer")
    fine = args.directions * len(slowfast.SPATIAL_FREQS) * len(slowfast.TEMPORAL_FREQS) * args.phases
    if args.slowfast and fine > MAX_GRATINGS:
        raise ValueError(f"--slowfast reads preferred TFs from up to {fine:,} gratings (directions x "
                         f"{len(slowfast.SPATIAL_FREQS) * len(slowfast.TEMPORAL_FREQS)} frequencies x phases), more "
                         f"than the {MAX_GRATINGS:,} kv3d tuning shows; use fewer --directions or --phases")
    model, params = _load(args.model, args.weights)
    model.check_layer(args.layer)
    directions = np.arange(args.directions) * 360.0 / args.directions
    responses = tuning.grating_responses(
        model, params, args.layer, directions, args.sf, args.tf, num_phases=args.phases
    )
    result = tuning.direction_tuning(responses, directions)
    stem = f"{model.name}_{args.layer}"
    png = tuning.polar_plot(output_path(out, f"{stem}_tuning.png"), result, directions,
                            title=f"{model.name} {args.layer}")
    writers.save_npz(
        output_path(out, f"{stem}_tuning.npz"), responses=responses, directions=directions, spatial_freqs=np.asarray(args.sf),
        temporal_freqs=np.asarray(args.tf), preferred_deg=result.preferred_deg, dsi=result.dsi, peak=result.peak,
    )
    selective = tuning.direction_selective(result)
    print("channel  preferred_deg    DSI     peak  best_sf  best_tf")
    for c, (pref, dsi, peak, s, f) in enumerate(zip(result.preferred_deg, result.dsi, result.peak, result.best_sf,
                                                    result.best_tf)):
        mark = "  DS" if selective[c] else ""
        print(f"{c:7d}  {pref:13.1f}  {dsi:5.2f}  {peak:7.3g}  {args.sf[s]:7.3g}  {args.tf[f]:7.3g}{mark}")
    print(f"{selective.sum()} of {len(selective)} channels of {model.name} {args.layer} are direction-selective "
          f"(DSI >= {tuning.DS_THRESHOLD} and a peak response of at least {tuning.PEAK_FRACTION:.0%} of the "
          f"layer's strongest); polar plots in {png}")
    if args.slowfast:
        _print_slowfast(model, params, args, result, selective)
    return 0


def _print_slowfast(model, params, args, result, selective) -> None:
    """Measures and prints ``kv3d tuning --slowfast``'s table for the direction-selective channels."""
    channels = np.flatnonzero(selective)
    if channels.size == 0:
        print("slow/fast: no direction-selective channel to measure")
        return
    tf = slowfast.grating_tf(model, params, args.layer, result.preferred_deg, channels, args.phases)
    config = maximization.preset("native", steps=args.slowfast_steps)
    bar = None

    def show(done, total, objective):
        nonlocal bar
        bar = bar or ProgressBar(total, label=f"slow/fast {model.name} {args.layer}")
        bar.update(done, objective=objective)

    # Batches of a visualize job's width: on a CPU, one batch of every pair took 1.7 times as long
    # (MotionNet conv3, docs/slowfast.md).
    measured = slowfast.measure(model, params, args.layer, channels, config=config, weights=args.slowfast_weights,
                                per_device=job.DEFAULT_BATCH, callback=show)
    if bar is not None:
        bar.close()
    index = np.full(selective.size, np.nan)
    index[measured.channels] = measured.index
    agreement = slowfast.agreement(index, tf, selective)
    print("channel  preferred_tf  slowfast_index  agree")
    for c in measured.channels:
        verdict = ("yes" if agreement.agree[c] else "no") if agreement.compared[c] else "-"
        print(f"{c:7d}  {tf[c]:12.4f}  {index[c]:14.3f}  {verdict}")
    compared = int(agreement.compared.sum())
    print(f"slow/fast index and grating TF preference agree in sign (fast = index below its median = preferred "
          f"TF above its median) on {int(agreement.agree[agreement.compared].sum())} of {compared} compared "
          f"channels ({agreement.share:.0%})")


_OUTPUT_KINDS = tuple(f"_{kind}" for kind in writers.DECOMPOSITION_FILES if kind != "stage1")


def _check_size(path, shape, frames: bool = True) -> None:
    """Refuses a video ``(T, H, W, ...)`` with an axis below 1, more than :data:`MAX_VIDEO_FRAMES`
    frames (unless ``frames`` is False: videos stacked along T) or more than :data:`MAX_VIDEO_PIXELS`
    pixels, before it is read."""
    t, h, w = (int(n) for n in shape[:3])
    if min(t, h, w) < 1:
        raise ValueError(f"{path} holds {t} frames of {h}x{w} pixels; kv3d decompose needs at least one frame "
                         "of at least 1x1 pixels")
    if frames and t > MAX_VIDEO_FRAMES:
        raise ValueError(f"{path} holds {t:,} frames, more than the {MAX_VIDEO_FRAMES:,} kv3d decompose reads from "
                         "one video; shorten it")
    if t * h * w > MAX_VIDEO_PIXELS:
        raise ValueError(f"{path} holds {t} frames of {h}x{w} pixels, more than the {MAX_VIDEO_PIXELS:,} "
                         "pixels kv3d decompose reads from one video; shorten or shrink it")


def _gif_shape(path: Path) -> tuple[int, int, int]:
    """``(frames, height, width)`` of a GIF, from its block structure alone (no frame is decoded):
    the logical screen, enlarged to every frame's extent as Pillow does. Refuses, while counting, a
    GIF of more than :data:`MAX_VIDEO_FRAMES` frames or :data:`_MAX_GIF_BLOCKS` data blocks."""
    if not regular_file(path, "GIF").stat().st_size:
        raise ValueError(f"{path} is not a readable GIF (the file is empty)")
    with open(path, "rb") as f:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:6] not in (b"GIF87a", b"GIF89a") or len(data) < 13:
                raise ValueError(f"{path} is not a readable GIF (it does not start with a GIF header)")
            width, height = struct.unpack("<HH", data[6:10])
            position = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
            frames = blocks = 0
            while position < len(data) and data[position] != 0x3B:
                if data[position] == 0x21:  # an extension: label, then data blocks
                    position += 2
                elif data[position] == 0x2C and position + 10 <= len(data):  # an image
                    left, top, w, h, flags = struct.unpack("<HHHHB", data[position + 1:position + 10])
                    position += 11 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # + LZW code size
                    frames, width, height = frames + 1, max(width, left + w), max(height, top + h)
                    if frames > MAX_VIDEO_FRAMES:
                        _check_size(path, (frames, height, width))
                else:
                    break  # not a block: Pillow decides what the GIF holds up to here
                while position < len(data):  # data blocks, up to the empty one
                    size = data[position]
                    position += 1 + size
                    blocks += 1
                    if size == 0:
                        break
                if blocks > _MAX_GIF_BLOCKS:
                    raise ValueError(f"{path} holds more than {_MAX_GIF_BLOCKS:,} GIF data blocks; kv3d decompose "
                                     "reads GIFs of fewer")
    return max(frames, 1), height, width


def _read_gif(path) -> np.ndarray:
    """A GIF as ``(T, H, W, 3)`` float32 in [0, 1] (grey and palette to RGB, alpha dropped).

    Its frame count and size are read from the file's blocks and checked against
    :data:`MAX_VIDEO_FRAMES` and :data:`MAX_VIDEO_PIXELS` before any frame is decoded.
    """
    _check_size(path, _gif_shape(path))
    try:
        with Image.open(path, formats=["GIF"]) as image:
            frames = []
            for index in range(min(image.n_frames, MAX_VIDEO_FRAMES)):
                image.seek(index)
                _check_size(path, (index + 1, image.size[1], image.size[0]))  # a frame may enlarge it
                frames.append(np.asarray(image.convert("RGB")))
            if frames:
                _check_size(path, (len(frames), *frames[-1].shape[:2]))
    except (Image.UnidentifiedImageError, Image.DecompressionBombError, EOFError, SyntaxError, OSError) as err:
        raise ValueError(f"{path} is not a readable GIF ({escape(str(err), 200)})") from None
    shapes = {frame.shape for frame in frames}
    if len(shapes) != 1:
        raise ValueError(f"{path} is not a readable GIF (its frames have different sizes)")
    return np.stack(frames).astype(np.float32) / 255.0


# The movie formats `kv3d decompose` reads, and the ffmpeg demuxer each is read with: forced, so that
# ffmpeg parses only the container the suffix names, never one it guesses from the file's content.
_MOVIE_DEMUXERS = {".mp4": "mov", ".webm": "matroska"}


def _read_movie(path: Path) -> np.ndarray:
    """An MP4 or WebM as ``(T, H, W, 3)`` float32 in [0, 1], decoded by imageio-ffmpeg's ffmpeg.

    ffmpeg reads only the regular file itself (the ``file`` protocol, the demuxer of its suffix);
    the frame size is checked against :data:`MAX_VIDEO_PIXELS` before any frame is decoded, and the
    frames against :data:`MAX_VIDEO_FRAMES` and :data:`MAX_VIDEO_PIXELS` as they arrive, so a file
    whose header understates its length is stopped, not read whole.
    """
    kind = path.suffix.lower()[1:].upper()
    source = f"file:{regular_file(path, kind).resolve()}"
    reader = imageio_ffmpeg.read_frames(
        source, input_params=["-protocol_whitelist", "file", "-f", _MOVIE_DEMUXERS[path.suffix.lower()]])
    try:
        decoded = _decoded(reader, path, kind)
        meta = next(decoded, None)
        if not meta or "size" not in meta:
            raise ValueError(f"{path} is not a readable {kind} (ffmpeg found no video in it)")
        width, height = meta["size"]
        _check_size(path, (1, height, width))
        frames = []
        for frame in decoded:
            _check_size(path, (len(frames) + 1, height, width))
            frames.append(np.frombuffer(frame, np.uint8).reshape(height, width, 3))
    finally:
        reader.close()
    if not frames:
        raise ValueError(f"{path} is not a readable {kind} (it holds no frames)")
    return np.stack(frames).astype(np.float32) / 255.0


def _decoded(reader, path: Path, kind: str):
    """The items of imageio-ffmpeg's ``reader`` (its metadata, then each frame's bytes), any error of
    ffmpeg's or of its header's parsing raised as one ValueError saying ``path`` is not a readable ``kind``."""
    try:
        yield from reader
    except (OSError, RuntimeError, KeyError, IndexError, ValueError) as err:
        raise ValueError(f"{path} is not a readable {kind} ({escape(str(err).strip() or type(err).__name__, 200)})"
                         ) from None


def _npy_header(archive: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape and dtype of array ``name`` of an ``.npz``, from its header alone, and how many bytes of
    data its member holds after the header (read later only if they are what the header needs)."""
    info = archive.getinfo(f"{name}.npy")
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"array {name!r} has .npy format version {version}")
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(member)
        header = member.tell()
    if not (len(shape) <= 32 and all(0 <= n < 2**40 for n in shape)) or dtype.hasobject or dtype.names:
        raise ValueError(f"array {name!r} is {escape(str(dtype), 40)} of shape {quote(shape)}, not plain numbers")
    return shape, dtype, info.file_size - header


def _check_held(path: Path, name: str, shape: tuple[int, ...], dtype: np.dtype, held: int) -> None:
    """Refuses array ``name`` unless its member holds exactly the bytes its header's shape and dtype need."""
    nbytes = math.prod(shape) * dtype.itemsize
    if held != nbytes:
        raise ValueError(f"{path}'s {name!r} is {dtype}{list(shape)}, {nbytes:,} bytes, but its member holds {held:,}")


def _read_npy(archive: zipfile.ZipFile, name: str) -> np.ndarray:
    with archive.open(f"{name}.npy") as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def _check_npz_directory(path: Path) -> None:
    """Refuses an ``.npz`` whose zip directory claims more than a stage-1 file's few members, before
    :mod:`zipfile` reads it (it builds an object per member)."""
    size = regular_file(path).stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - (1 << 16) - 22))
        tail = f.read()
    end = tail.rfind(b"PK\x05\x06")
    if end < 0 or len(tail) < end + 22:
        raise ValueError(f"{path} is not an .npz archive (no zip directory)")
    members, size = struct.unpack("<HI", tail[end + 10:end + 16])
    if members > _MAX_NPZ_MEMBERS or size > _MAX_NPZ_DIRECTORY:
        raise ValueError(f"{path} claims {members:,} arrays in a {size:,}-byte directory; a stage-1 .npz holds "
                         f"at most {_MAX_NPZ_MEMBERS} (and kv3d reads no ZIP64 archive)")


def _stage1_names(archive: zipfile.ZipFile, path: Path, names: set, count: int) -> list[str] | None:
    """The stems ``{model}_{layer}_{channel}`` of a stage-1 ``.npz``'s ``count`` videos, if it names them;
    each part checked to be kv3d's own: a registered model, one of its layers, channels 0 to 2^31 - 1."""
    if not {"model", "layer", "channels"} <= names:
        return None
    headers = {name: _npy_header(archive, name) for name in ("model", "layer", "channels")}
    for name in ("model", "layer"):
        shape, dtype, held = headers[name]
        if shape != () or dtype.kind != "U" or dtype.itemsize > 4 * 200:
            raise ValueError(f"{path}'s {name!r} is {dtype}{list(shape)}, not a name")
        _check_held(path, name, shape, dtype, held)
    shape, dtype, held = headers["channels"]
    if shape != (count,) or dtype.kind not in "iu":
        raise ValueError(f"{path}'s 'channels' is {dtype}{list(shape)}, not {count} channel numbers")
    _check_held(path, "channels", shape, dtype, held)
    model, layer = str(_read_npy(archive, "model")), str(_read_npy(archive, "layer"))
    if model not in models.names():
        raise ValueError(f"{path} names model {quote(model)}, which kv3d does not know; valid models are: "
                         f"{', '.join(models.names())}")
    if layer not in models.layer_names(model):
        raise ValueError(f"{path} names layer {quote(layer)}, which {model} does not have")
    channels = _read_npy(archive, "channels")
    if channels.size and not (channels.min() >= 0 and channels.max() < 2**31):
        raise ValueError(f"{path}'s channels are not numbers from 0 to {2**31 - 1}")
    return [writers.kernel_stem(model, layer, int(c)) for c in channels]


def _read_stage1(path: Path) -> list[tuple[str, np.ndarray]]:
    """``(stem, video)`` pairs of a stage-1 ``.npz`` (``videos`` ``(K, T, H, W, 3)``, and ``model``,
    ``layer``, ``channels`` to name them); only these arrays are read, each after its shape and dtype
    are read from its header and checked, and the videos must be finite."""
    _check_npz_directory(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = {name.removesuffix(".npy") for name in archive.namelist()}
            if "videos" not in names:
                raise ValueError(f"{path} has no 'videos' array (K, T, H, W, 3); `kv3d maximize` writes one")
            shape, dtype, held = _npy_header(archive, "videos")
            if len(shape) != 5 or shape[-1] != 3 or dtype.kind not in "fiu":
                raise ValueError(f"{path}'s 'videos' is {dtype}{list(shape)}, not numbers (K, T, H, W, 3)")
            if shape[0] < 1:
                raise ValueError(f"{path}'s 'videos' holds no video")
            _check_size(path, (shape[0] * shape[1], *shape[2:4]), frames=False)
            _check_size(path, shape[1:4])
            _check_held(path, "videos", shape, dtype, held)
            stems = _stage1_names(archive, path, names, shape[0]) or [f"{path.stem}_{k}" for k in range(shape[0])]
            with np.errstate(over="ignore", invalid="ignore"):
                videos = np.asarray(_read_npy(archive, "videos"), np.float32)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path} is not an .npz archive ({escape(str(err), 200)})") from None
    bad = int(np.size(videos) - np.isfinite(videos).sum())
    if bad:
        raise ValueError(f"{path}'s 'videos' holds {bad:,} values that are not finite (in float32)")
    return list(zip(stems, videos))


def _decompose_inputs(path: str) -> list[tuple[str, np.ndarray]]:
    """``(stem, video)`` pairs from a GIF, an MP4 or WebM (:func:`_read_movie`), a folder of GIFs or a
    stage-1 ``.npz`` (key ``videos``).

    Every file is checked to be a regular file before it is opened, and every GIF's size from its
    blocks before any is decoded: at most :data:`MAX_TOTAL_PIXELS` pixels in all.
    """
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if source.suffix == ".npz":
        return _read_stage1(regular_file(source))
    if source.is_dir():
        found = (p for p in source.glob("*.gif") if not p.stem.endswith(_OUTPUT_KINDS))
        gifs = sorted(itertools.islice(found, MAX_GIFS + 1))
        if len(gifs) > MAX_GIFS:
            raise ValueError(f"{path} holds more than {MAX_GIFS:,} GIFs; decompose fewer at a time")
        if not gifs:
            raise ValueError(f"{path} holds no GIFs to decompose (outputs of `kv3d decompose` are skipped)")
    elif source.suffix.lower() == ".gif":
        gifs = [source]
    elif source.suffix.lower() in _MOVIE_DEMUXERS:
        return [(source.stem.removesuffix("_stage1"), _read_movie(source))]
    else:
        raise ValueError(f"{path} is neither a GIF, an MP4, a WebM, a folder of GIFs nor an .npz of stage-1 videos")
    total = 0
    for gif in gifs:
        shape = _gif_shape(regular_file(gif, "GIF"))
        _check_size(gif, shape)
        total += math.prod(shape)
        if total > MAX_TOTAL_PIXELS:
            raise ValueError(f"{path} holds GIFs of more than {MAX_TOTAL_PIXELS:,} pixels in all; decompose fewer "
                             "at a time")
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
    p.add_argument("source", help="a GIF, an MP4, a WebM, a folder of GIFs, or a stage-1 .npz with a 'videos' array")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=_at_least(0), default=2000, help="optimisation steps (default 2000)")
    p.set_defaults(run=_run_decompose)


def _run_decompose(args) -> int:
    out = _output_folder(args.out)
    inputs = _decompose_inputs(args.source)
    for stem, _ in inputs:  # every name is checked before any work
        for kind in writers.DECOMPOSITION_FILES:
            output_path(out, f"{stem}_{kind}.{'png' if kind == 'static' else 'gif'}")
    groups: dict[tuple, list[tuple[str, np.ndarray]]] = {}
    for stem, video in inputs:
        groups.setdefault(video.shape, []).append((stem, video))
    for shape, items in groups.items():
        stems, videos = zip(*items)
        videos = np.stack(videos)
        bar = ProgressBar(args.steps, label=f"decompose {len(videos)}x{'x'.join(map(str, shape[:3]))}")
        result = decompose(videos, config=decomposition.Config(steps=args.steps),
                           callback=lambda done, total, _: bar.update(done))
        bar.close()
        summary = motion_summary(result)
        for k, stem in enumerate(stems):
            writers.save_decomposition(out, stem, videos[k], result.static[k], result.displacement[k],
                                       result.reconstruction[k], valid=np.asarray(summary.weight[k]) > 0)
            speed = ("ambiguous (aliased)" if bool(summary.aliased[k])
                     else f"{float(summary.speed[k]):.3f} px/frame")
            print(f"{stem}: direction {float(summary.direction_deg[k]):5.1f} deg, speed {speed}, PSNR "
                  f"{float(summary.psnr[k]):.1f} dB, motion explains {float(summary.explained[k]):.0%} of the "
                  f"frames' change")
    print(f"{len(inputs)} videos decomposed; files in {args.out}")
    return 0


def _add_processes(p) -> None:
    """The flags that run a command on several processes (``jax.distributed``)."""
    p.add_argument("--coordinator", help="HOST:PORT of process 0, to share the work among --num-processes "
                   "processes (jax.distributed); every process gets the same other flags")
    p.add_argument("--num-processes", type=_at_least(1), help="processes sharing the work (with --coordinator)")
    p.add_argument("--process-id", type=_at_least(0), help="this process's index, 0 … num-processes − 1 "
                   "(with --coordinator)")
    p.add_argument("--distributed", action="store_true", help="join a jax.distributed run whose processes JAX "
                   "finds on its own (a Cloud TPU pod slice, SLURM, Open MPI): jax.distributed.initialize()")


def _start_processes(args) -> None:
    """Joins the ``jax.distributed`` run the flags of :func:`_add_processes` describe, if any."""
    given = [name for name in ("num_processes", "process_id") if getattr(args, name) is not None]
    if args.distributed and (args.coordinator or given):
        raise ValueError("use either --distributed (JAX finds the processes) or --coordinator with "
                         "--num-processes and --process-id, not both")
    if args.distributed:
        jax.distributed.initialize()
    elif args.coordinator:
        if len(given) < 2:
            raise ValueError("--coordinator needs --num-processes N and --process-id I (0 … N−1)")
        if args.process_id >= args.num_processes:
            raise ValueError(f"--process-id must be below --num-processes ({args.num_processes}), got {args.process_id}")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif given:
        raise ValueError("--num-processes and --process-id need --coordinator HOST:PORT (process 0's address)")


def _add_visualize(sub) -> None:
    p = sub.add_parser(
        "visualize",
        help="stage 1 + stage 2 for every channel of some layers, resumable, with an HTML gallery",
        description="For every chosen channel of each layer: the video that maximally activates it "
        "(stage 1), its split into a static texture and motion (stage 2) and their pictures, stored "
        "per kernel in --out so that an interrupted run resumes where it stopped; then an HTML "
        f"gallery (OUT/index.html). With no options: every channel of {job.DEFAULT_MODEL}'s (embedded, no "
        f"weights needed) layers {', '.join(job.DEFAULT_LAYERS)} at the {_DEFAULTS['preset']} preset with "
        f"{_DEFAULTS['steps']} + {_DEFAULTS['decompose_steps']} steps, a few minutes on a CPU. Several "
        "processes (--coordinator or --distributed) share every layer's kernels and write into one --out "
        "on a shared filesystem; a kernel's files are the same whatever the processes, devices or resumes.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=_MODEL_HELP)
    p.add_argument("--weights", help=f"params file from `kv3d convert`, or the checkpoint itself "
                   f"(not needed for {job.DEFAULT_MODEL})")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--layer", action="append", help="a layer to visualise (repeatable); "
                       "`kv3d layers MODEL` lists them")
    which.add_argument("--layers", choices=("all",), help="all: every layer of the model")
    p.add_argument("--channels", default="all", help="'all' (default), a range '0-15' or a list '3,7,9'; "
                   "channels with names (inception_i3d's Logits: Kinetics classes) also by name, "
                   "'playing cricket,juggling balls'")
    p.add_argument("--out", default=job.DEFAULT_OUT, help=f"run folder (default {job.DEFAULT_OUT}); "
                   "rerun with the same settings to resume")
    p.add_argument("--preset", choices=tuple(PRESETS), help=f"stage-1 preset (default {_DEFAULTS['preset']} for "
                   f"{job.DEFAULT_MODEL}, {job.OTHER_MODELS['preset']} for other models)")
    p.add_argument("--steps", type=_at_least(1), help=f"stage-1 steps (default {_DEFAULTS['steps']} for "
                   f"{job.DEFAULT_MODEL} at {_DEFAULTS['preset']}, else the preset's)")
    p.add_argument("--decompose-steps", type=_at_least(1), help=f"stage-2 steps (default "
                   f"{_DEFAULTS['decompose_steps']} for {job.DEFAULT_MODEL}, else {job.OTHER_MODELS['decompose_steps']})")
    p.add_argument("--batch", type=_at_least(1), default=job.DEFAULT_BATCH, help=f"kernels per device in every "
                   f"compiled batch (default {job.DEFAULT_BATCH}); part of the run's settings, since another batch "
                   "shape may round differently; lower it if a batch does not fit in memory")
    p.add_argument("--chunk", type=_at_least(1), help="kernels a process computes and stores together, rounded up "
                   "to --batch on every device (default: one batch); results do not depend on it")
    p.add_argument("--media", choices=tuple(MEDIA), default=MEDIA[0], help=f"format of the moving pictures "
                   f"(default {MEDIA[0]}; gif plays anywhere but is several times larger)")
    p.add_argument("--parameterization", choices=job.STAGE1_PARAMETERIZATIONS, default="pixel",
                   help="how stage 1 represents a video: pixel (default), fourier, or maco (only the phase of its "
                   "spectrum is optimised, the magnitude fixed to the natural-video law; docs/maco.md)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed, 0 to 2**63-1 (default 0)")
    p.add_argument("--rectify", action="store_true", help="maximise each channel after a ReLU (for layers "
                   "whose output is linear in the input, whose optimum is otherwise a flat colour)")
    p.add_argument("--refine", type=_at_least(0), nargs="?", const=REFINE_STEPS, default=0, metavar="STEPS",
                   help="add stage 3: maximise each kernel over the static and displacement of its decomposition "
                   f"for STEPS steps (default {REFINE_STEPS}); files *_refined_{{video,static,motion,deform}} "
                   "beside the stage-2 ones")
    p.add_argument("--refine-motion", choices=tuple(MOTIONS), default=RefineConfig.motion,
                   help=f"what stage 3's motion may be: constant (each pixel at a constant velocity, as in a "
                   f"drifting grating) or free (any displacement per frame); default {RefineConfig.motion}")
    p.add_argument("--slowfast", type=_penalty_weight, nargs="?", const=slowfast.DEFAULT_WEIGHT, default=0.0,
                   metavar="LAMBDA", help="add each kernel's slow/fast index: stage 1 again under a penalty "
                   f"LAMBDA (default {slowfast.DEFAULT_WEIGHT:g}; 1/TV units) on the change between frames, and the "
                   "fraction of the objective it keeps (high = slow; Feichtenhofer et al.; docs/slowfast.md), in "
                   "each kernel record and the gallery; doubles stage 1's time; 0 (the default): off")
    p.add_argument("--diversity", type=_optima_count, default=0, metavar="N",
                   help=f"add N distinct optima per channel (2 to {MAX_DIVERSITY}), pushed apart by a penalty on "
                   "alike activation patterns (docs/diversity.md), in each kernel record and side by side in the "
                   "gallery; one stage 1 of N videos at once, so it adds about N times stage 1's time; 0 (the "
                   "default): off")
    p.add_argument("--diversity-steps", type=_at_least(1), metavar="STEPS",
                   help="with --diversity: the diverse optima's steps (default: stage 1's, at least "
                   f"{job.DIVERSITY_STEPS}, the fewest at which MotionNet conv3's optima came out distinct)")
    p.add_argument("--dtype", default="float32", choices=job.DTYPES,
                   help="dtype the model computes in (default float32; optimised videos stay float32)")
    p.add_argument("--memory-budget", type=float, metavar="GIB",
                   help="check before the run that a batch fits in GIB per device (XLA's memory analysis); "
                   "without it, a batch that does not fit fails when it runs")
    _add_processes(p)
    p.set_defaults(run=_run_visualize)


def _run_visualize(args) -> int:
    if args.diversity_steps is not None and not args.diversity:
        raise ValueError("--diversity-steps sets the steps of the diverse optima; add --diversity N")
    if args.memory_budget is not None and not 2.0**-10 <= args.memory_budget <= _MAX_MEMORY_GIB:
        raise ValueError(f"--memory-budget must be a positive, finite number of GiB, from 1/1024 (1 MiB) to "
                         f"{_MAX_MEMORY_GIB:,.0f}, got {args.memory_budget}")
    the_job = job.Job.create(args.model, args.preset, args.steps, args.decompose_steps, seed=args.seed,
                             rectify=args.rectify, refine_steps=args.refine, refine_motion=args.refine_motion,
                             dtype=args.dtype, batch=args.batch, media=args.media,
                             parameterization=args.parameterization, slowfast=args.slowfast,
                             diversity=args.diversity, diversity_steps=args.diversity_steps)
    if not args.layer and args.layers is None and the_job.model != job.DEFAULT_MODEL:
        raise ValueError(f"choose layers of {the_job.model} with --layer L (repeatable) or --layers all; "
                         f"valid layers are: {', '.join(models.get(the_job.model).layers)}")
    out = _output_folder(args.out)
    _start_processes(args)
    model, params = _load(the_job.model, args.weights)
    layers = job.layers(model, args.layer, every=args.layers == "all")
    if args.memory_budget is not None:
        pipeline.check_memory(model, params, the_job, layers, int(args.memory_budget * 2**30))
    shown: list = []  # [layer, its ProgressBar] of the layer being computed

    def progress(layer: str, done: int, total: int, stage: int) -> None:
        if not shown or shown[0] != layer:
            if shown:
                shown[1].close()
            shown[:] = [layer, ProgressBar(total, label=f"{model.name} {layer}")]
        shown[1].update(done, stage=stage)

    try:
        index = pipeline.visualize(model, params, the_job, layers, args.channels, out,
                                   log=lambda message: print(message, file=sys.stderr), progress=progress,
                                   chunk=args.chunk)
    finally:
        if shown:
            shown[1].close()
    if index is None:
        print(f"process {jax.process_index()}: share done; process 0 writes the gallery")
    else:
        print(f"results: {index.resolve()}")
    return 0


def _add_gallery(sub) -> None:
    p = sub.add_parser(
        "gallery",
        help="(re)write the HTML gallery of a `kv3d visualize` run folder from its finished kernels",
        description="Writes RUN/index.html and a page per layer from the kernels RUN holds, redrawing any "
        "missing picture: at any time no run is writing into RUN, e.g. after one was killed.",
    )
    p.add_argument("folder", metavar="RUN", help="the run folder")
    p.add_argument("--weights", help=f"the run's params file or checkpoint (not needed for {job.DEFAULT_MODEL})")
    p.set_defaults(run=_run_gallery)


def _run_gallery(args) -> int:
    folder = _output_folder(args.folder)
    the_job, model, params = agreement.load_run(folder, args.weights)
    with Store.open(folder, the_job.config(model), params_checksum(params)) as store:
        if not any(store.finished(layer) for layer in store.layers()):
            raise ValueError(f"{args.folder} holds no finished kernels yet; run `kv3d visualize --out {args.folder}` "
                             "first")
        index = pipeline.build_gallery(store, model, the_job, folder)
    print(f"results: {index.resolve()}")
    return 0


def _add_agreement(sub) -> None:
    p = sub.add_parser(
        "agreement",
        help="grating-preferred vs stage-2 direction of the direction-selective channels of a run",
        description="For each layer of a `kv3d visualize` run folder: every direction-selective "
        f"channel's (DSI >= {tuning.DS_THRESHOLD} and a peak response of at least --min-peak of the layer's "
        "strongest) preferred drifting-grating direction beside the dominant direction of its stage-2 motion "
        "(or, with --stage refined, of its refinement's), and the median angular difference over all of them, "
        "the reliable ones and the rest. Writes OUT/agreement.md (OUT/agreement_refined.md).",
    )
    p.add_argument("--out", default=job.DEFAULT_OUT, help=f"the run folder (default {job.DEFAULT_OUT})")
    p.add_argument("--weights", help=f"the run's params file or checkpoint (not needed for {job.DEFAULT_MODEL})")
    p.add_argument("--layer", action="append", help="only this layer (repeatable)")
    p.add_argument("--stage", default="stage2", choices=tuple(agreement.STAGES),
                   help="whose motion to compare: stage2 (default) or refined (a run made with --refine)")
    p.add_argument("--min-peak", type=float, default=tuning.PEAK_FRACTION, metavar="FRACTION",
                   help=f"least peak response of a direction-selective channel, as a fraction of the layer's "
                   f"strongest (default {tuning.PEAK_FRACTION}; 0 counts every channel with DSI >= "
                   f"{tuning.DS_THRESHOLD})")
    p.set_defaults(run=_run_agreement)


def _run_agreement(args) -> int:
    _output_folder(args.out)
    if not 0.0 <= args.min_peak <= 1.0:
        raise ValueError(f"--min-peak must be a fraction between 0 and 1, got {args.min_peak}")
    rows, medians, compared = agreement.report(args.out, args.weights, args.layer, args.stage, args.min_peak)
    if not compared:
        raise ValueError(f"{args.out} holds no finished kernels yet; run `kv3d visualize --out {args.out}` first")
    table = agreement.markdown(rows, medians, args.stage)
    name = "agreement.md" if args.stage == "stage2" else f"agreement_{args.stage}.md"
    writers.save_text(output_path(args.out, name), table)
    print(table, end="")
    reliable = sum(bool(row.reliable) for row in rows)
    print(f"{len(rows)} of {compared} kernels are direction-selective, {reliable} of them reliable; "
          f"table in {args.out}/{name}")
    return 0


_SUBCOMMANDS: list = [_add_convert, _add_layers, _add_maximize, _add_tuning, _add_decompose, _add_visualize,
                      _add_gallery, _add_agreement]

if __name__ == "__main__":
    sys.exit(main())
