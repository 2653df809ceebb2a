"""``kv3d visualize``: every chosen kernel through stage 1, stage 2 and the writers, into a
resumable results store (:mod:`kv3d_jax.store`), then the gallery (:mod:`kv3d_jax.gallery`).

The work of a layer is cut into chunks of kernels; a chunk is one batched
:func:`~kv3d_jax.maximization.maximize` and one batched :func:`~kv3d_jax.decomposition.decompose`
call (and one :func:`~kv3d_jax.refinement.refine` with stage 3), each batched and sized by the
runner (:mod:`kv3d_jax.runner`), and each of its kernels is stored as soon as the chunk is done.
A kernel that turns non-finite in a stage is stored as failed (``failed``: the stage's number)
and changes no other kernel's result. Every kernel's
randomness comes from ``(seed, layer, channel)`` alone and both stages treat the kernels
of a batch independently, so an interruption changes no result, and the chunk size none
beyond float rounding (another batch size may reorder a reduction: measured ≤ 1e-7
relative on the arrays, ~1e-5 on the trust scores, which are ratios of sums over a clip);
a resumed sweep computes exactly the kernels that have no file yet.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import zlib
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kv3d_jax import decomposition, gallery, maximization, refinement, reliability, writers
from kv3d_jax.decomposition import decompose
from kv3d_jax.maximization import get_preset, maximize
from kv3d_jax.models import motionnet
from kv3d_jax.motion import motion_summary, observability
from kv3d_jax.refinement import MOTIONS, Config as RefineConfig, refine
from kv3d_jax.store import Store, params_checksum
from kv3d_jax.untrusted import output_path

# `kv3d visualize` with no arguments: all 176 channels of the embedded MotionNet's conv layers.
# The step counts trade agreement with the channels' grating tuning against a job of at most
# 5 minutes on 2 CPU cores; README.md ("Do the visualisations tell the truth?") has both
# measurements. Stage 1 dominates the time: re-measure when its speed changes.
DEFAULT_JOB = {
    "model": "motionnet",
    "layers": motionnet.CONV_LAYERS,
    "preset": "native",
    "steps": 40,
    "decompose_steps": 200,
    "chunk": 16,
    "seed": 0,
    "out": "kv3d_out",
}
# For any other model: the paper preset with its steps, and the reference's decomposition steps (SPEC §3).
OTHER_MODELS = {"preset": "paper", "decompose_steps": 2000}

SUMMARY = ("objective", "direction_deg", "speed", "psnr", "failed")
# How far a kernel's pictures can be trusted (kv3d_jax.reliability); booleans stored as 0/1.
TRUST = ("reliability", "reliable", "dead", "aliased", "gain", "explained")
# What the refinement adds to a kernel's record, each name prefixed "refined_".
REFINED = ("video", "static", "displacement", "objective", "direction_deg", "speed")
# The dtypes a model may run in (Settings.dtype).
DTYPES = ("float32", "bfloat16")
# Width (px) of the frame border the motion read-out leaves out (motion.motion_summary's default).
_BORDER = 2


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a kernel's result depends on besides the model params (``run.json``'s config).

    Attributes:
      model: registry name of the model.
      preset: stage-1 preset name (:data:`kv3d_jax.maximization.PRESETS`).
      steps: stage-1 optimisation steps.
      decompose_steps: stage-2 optimisation steps.
      seed: the seed every kernel's PRNG keys are derived from.
      rectify: maximise the activation after a ReLU (SPEC §5) rather than the layer's output.
      refine_steps: steps of the texture-plus-motion refinement (:mod:`kv3d_jax.refinement`),
        started from each decomposition; 0 skips it.
      refine_motion: the motion the refinement may use (:attr:`kv3d_jax.refinement.Config.motion`).
      dtype: the dtype the model runs in, ``"float32"`` or ``"bfloat16"``.
      rectify_linear: rectify the layers whose output is linear in the input (``model.linear_layers``),
        whose channel mean would otherwise peak at a flat colour (SPEC §5).
    """

    model: str
    preset: str
    steps: int
    decompose_steps: int
    seed: int
    rectify: bool = False
    refine_steps: int = 0
    refine_motion: str = RefineConfig.motion
    dtype: str = "float32"
    rectify_linear: bool = True

    def rectified(self, model, layer: str) -> bool:
        """Whether stage 1 maximises ``layer`` of ``model`` after a ReLU."""
        return self.rectify or (self.rectify_linear and layer in model.linear_layers)

    def __post_init__(self):
        get_preset(self.preset)
        for name in ("steps", "decompose_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.refine_steps < 0:
            raise ValueError(f"refine_steps must be at least 1 (or 0 for no refinement), got {self.refine_steps}")
        if not -2**63 <= self.seed < 2**63:
            raise ValueError(f"seed must be a 64-bit signed integer, got {self.seed}")
        if self.refine_motion not in MOTIONS:
            raise ValueError(f"unknown refine_motion {self.refine_motion!r}; valid motions are: {', '.join(MOTIONS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; valid dtypes are: {', '.join(DTYPES)}")


def job_settings(model: str | None = None, preset: str | None = None, steps: int | None = None,
                 decompose_steps: int | None = None, seed: int | None = None, rectify: bool = False,
                 refine_steps: int = 0, refine_motion: str = RefineConfig.motion, dtype: str = "float32",
                 rectify_linear: bool = True) -> Settings:
    """:class:`Settings` with every option not given filled in: from :data:`DEFAULT_JOB` for its
    model (and, for ``steps``, its preset), else from :data:`OTHER_MODELS` and the preset."""
    model = model or DEFAULT_JOB["model"]
    default = model == DEFAULT_JOB["model"]
    preset = preset or (DEFAULT_JOB if default else OTHER_MODELS)["preset"]
    if steps is None:
        steps = DEFAULT_JOB["steps"] if default and preset == DEFAULT_JOB["preset"] else get_preset(preset).steps
    if decompose_steps is None:
        decompose_steps = (DEFAULT_JOB if default else OTHER_MODELS)["decompose_steps"]
    return Settings(model, preset, steps, decompose_steps, DEFAULT_JOB["seed"] if seed is None else seed, rectify,
                    refine_steps, refine_motion, dtype, rectify_linear)


def job_layers(model, layers: Sequence[str] | None, every: bool = False) -> tuple[str, ...]:
    """The layers to visualise: ``layers`` (checked), all of the model's if ``every``, else
    :data:`DEFAULT_JOB`'s for its model; other models need them named."""
    if every:
        return tuple(model.layers)
    if layers:
        return tuple(model.check_layer(layer) for layer in layers)
    if model.name == DEFAULT_JOB["model"]:
        return tuple(DEFAULT_JOB["layers"])
    raise ValueError(f"name the layers of {model.name} to visualise (the default job covers only "
                     f"{DEFAULT_JOB['model']}); valid layers are: {', '.join(model.layers)}")


def parse_channels(spec: str, num_channels: int, layer: str = "the layer", names: Sequence[str] = ()) -> list[int]:
    """The channels ``spec`` names, each once, in the order first named: ``"all"``, a range ``"0-15"``,
    a list ``"3,7,9"`` or a mix such as ``"0-3,8"``; every one must be below ``num_channels``
    (``layer`` names the layer in errors). With ``names`` (the layer's channel names,
    ``VideoModel.names_of``), an item may also be a channel's name (``"playing cricket"``); an
    unknown one is an error listing the closest names.

    Bounds are checked before a range is expanded, so the result never holds more than
    ``num_channels`` entries whatever ``spec`` says.
    """
    spec = spec.strip()
    if spec == "all":
        return list(range(num_channels))
    channels: dict[int, None] = {}
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match and names:
            channels[_named_channel(part.strip(), names, layer)] = None
            continue
        if not match:
            raise ValueError(f"cannot read channels {spec!r}; write e.g. 'all', '0-15' or '3,7,9'")
        lo, hi = (int(n) if len(n) <= 18 else num_channels for n in (match[1], match[2] or match[1]))
        if hi < lo:
            raise ValueError(f"channel range {part.strip()!r} is empty; write it low-high, e.g. '{hi}-{lo}'")
        if hi >= num_channels:
            raise ValueError(f"{layer} has channels 0..{num_channels - 1}; got {part.strip()!r}")
        channels.update(dict.fromkeys(range(lo, hi + 1)))
    return list(channels)


def _named_channel(name: str, names: Sequence[str], layer: str) -> int:
    """The index of channel ``name`` among ``names``, else a ValueError listing the closest names."""
    if name in names:
        return list(names).index(name)
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"closest: {', '.join(map(repr, close))}" if close else "write e.g. '0-15' or a name such as " + repr(names[0])
    raise ValueError(f"{layer} has no channel named {name!r}; {hint}")


def video_shape(model, settings: Settings) -> tuple[int, int, int]:
    """The ``(T, H, W)`` of the optimised videos: the preset's, else the model's input size."""
    return tuple(get_preset(settings.preset).shape or model.input_shape)


def run_config(model, settings: Settings) -> dict:
    """What a run folder records its results depend on besides the params: ``settings``, the video
    shape and, for a model built with hyper-parameters, its config (``model_config``)."""
    config = {**dataclasses.asdict(settings), "video_shape": video_shape(model, settings)}
    return {**config, "model_config": dict(model.config)} if model.config else config


def kernel_schema(shape: tuple[int, int, int], refined: bool = False) -> dict[str, tuple[int, ...]]:
    """Name → shape of every (float32) array stored for a kernel with ``(T, H, W)`` videos; with
    ``refined``, also the refinement's (:data:`REFINED`, each prefixed ``refined_``)."""
    t, h, w = shape
    schema = {
        "video": (t, h, w, 3),
        "static": (h, w, 3),
        "displacement": (t, h, w, 2),
        "reconstruction": (t, h, w, 3),
        **{name: () for name in SUMMARY + TRUST},
    }
    return {**schema, **{f"refined_{name}": schema[name] for name in REFINED}} if refined else schema


def layer_key(seed: int, layer: str) -> jax.Array:
    """The PRNG key of ``layer``'s kernels, from the seed and the layer's name."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(layer.encode()) & 0x7FFFFFFF)


def compute_chunk(model, params, layer: str, channels: Sequence[int], settings: Settings,
                  progress=None, memory_budget: int | None = None) -> dict[int, dict[str, np.ndarray]]:
    """Stage 1, stage 2 and the motion read-out of ``channels`` of ``layer``, batched:
    ``{channel: record}`` with the float32 arrays of :func:`kernel_schema`.

    Stage 1 folds each channel into ``fold_in(layer key, 1)``; stage 2 gets
    ``fold_in(fold_in(layer key, 2), channel)`` per kernel. ``progress(stage, done, total)``
    is called as steps finish. With ``settings.refine_steps``, the refinement (stage 3) starts
    from stage 2's result with ``fold_in(layer key, 3)``. Every stage batches its kernels within
    ``memory_budget`` bytes per device (default: the runner's). A record's ``failed`` is 0, or
    the number of the first stage whose result for the kernel is not finite; its
    :data:`TRUST` fields come from :func:`kv3d_jax.motion.motion_summary` with stage 1's
    objective against random videos drawn with ``fold_in(layer key, 4)``.
    """
    key = layer_key(settings.seed, layer)
    common = dict(memory_budget=memory_budget, compute_dtype=jnp.dtype(settings.dtype))

    def report(stage):
        return None if progress is None else lambda done, total, _: progress(stage, done, total)

    config = maximization.preset(settings.preset, steps=settings.steps, rectify=settings.rectified(model, layer))
    stage1 = maximize(model, params, layer, list(channels), key=jax.random.fold_in(key, 1), callback=report(1),
                      config=config, **common)
    dec = decompose(stage1.videos, channels, config=decomposition.Config(steps=settings.decompose_steps),
                    key=jax.random.fold_in(key, 2), callback=report(2), **common)
    targets = np.asarray(channels, np.int64)
    random = reliability.baseline(model, params, layer, targets, jax.random.fold_in(key, 4), config,
                                  compute_dtype=common["compute_dtype"])
    peak = reliability.peak(model, params, layer, targets, stage1.videos, config, common["compute_dtype"])
    summary = motion_summary(dec, border=_BORDER, objective=stage1.objective, baseline=random, peak=peak)
    gain = reliability.gain(stage1.objective, random)
    failed = np.where(stage1.failed, 1, np.where(dec.failed, 2, 0))
    arrays = {
        "video": stage1.videos, "objective": stage1.objective, "static": dec.static,
        "displacement": dec.displacement, "reconstruction": dec.reconstruction,
        "direction_deg": summary.direction_deg, "speed": summary.speed, "psnr": summary.psnr,
        "reliability": summary.reliability, "reliable": summary.reliable, "aliased": summary.aliased,
        "dead": reliability.dead(peak, gain), "gain": gain, "explained": summary.explained,
    }
    if settings.refine_steps:
        config = refinement.Config(motion=settings.refine_motion, steps=settings.refine_steps,
                                   preset=maximization.preset(settings.preset, rectify=config.rectify))
        refined = refine(model, params, layer, dec, list(channels), config=config, key=jax.random.fold_in(key, 3),
                         callback=report(3), **common)
        motion = motion_summary(refined, border=_BORDER)
        failed = np.where(failed == 0, np.where(refined.failed, 3, 0), failed)
        arrays.update(refined_video=refined.video, refined_static=refined.static,
                      refined_displacement=refined.displacement, refined_objective=refined.objective,
                      refined_direction_deg=motion.direction_deg, refined_speed=motion.speed)
    arrays["failed"] = failed
    arrays = {name: np.asarray(value, np.float32) for name, value in arrays.items()}
    return {int(c): {name: value[i] for name, value in arrays.items()} for i, c in enumerate(channels)}


def media_names(model: str, layer: str, channel: int) -> dict[str, str]:
    """File names of a kernel's pictures, as :func:`kv3d_jax.writers.save_decomposition` names them."""
    stem = writers.kernel_stem(model, layer, channel)
    return {kind: f"{stem}_{kind}.{'png' if kind == 'static' else 'gif'}" for kind in writers.DECOMPOSITION_FILES}


@jax.jit
def _read_out_support(static, displacement):
    """Where the motion read-out averages velocities ``(T-1, H, W)``: drawn in colour, the rest grey."""
    return observability(static, displacement, _BORDER) > 0


def refined_media_names(model: str, layer: str, channel: int) -> dict[str, str]:
    """File names of a kernel's refinement pictures, as :func:`kv3d_jax.writers.save_refinement` names them."""
    stem = writers.kernel_stem(model, layer, channel)
    return {kind: f"{stem}_{kind}.{'png' if kind == 'refined_static' else 'gif'}" for kind in writers.REFINEMENT_FILES}


def write_media(folder: Path, model: str, layer: str, channel: int, record: dict) -> None:
    """Writes a kernel's pictures (SPEC §4) into ``folder`` from its ``record``, and its
    refinement's beside them if the record holds one. A failed kernel's non-finite values are
    drawn as 0."""
    record = {name: np.nan_to_num(value) for name, value in record.items()}
    valid = np.asarray(_read_out_support(record["static"], record["displacement"]))
    written = writers.save_decomposition(folder, writers.kernel_stem(model, layer, channel), record["video"],
                                         record["static"], record["displacement"], record["reconstruction"],
                                         valid=valid)
    names = media_names(model, layer, channel)
    if "refined_static" in record:
        valid = np.asarray(_read_out_support(record["refined_static"], record["refined_displacement"]))
        written.update(writers.save_refinement(folder, writers.kernel_stem(model, layer, channel),
                                               record["refined_video"], record["refined_static"],
                                               record["refined_displacement"], valid=valid))
        names.update(refined_media_names(model, layer, channel))
    if {kind: path.name for kind, path in written.items()} != names:
        raise RuntimeError(f"the writers named their files {written}, not {names}")


Log = Callable[[str], None]
# progress(layer, done, total, stage): ``done`` of the layer's ``total`` steps (every chunk's
# stage-1, stage-2 and stage-3 steps) are finished; ``stage`` is the one running.
Progress = Callable[[str, int, int, int], None]


def _stage_progress(layer: str, chunks: int, settings: Settings, progress: Progress) -> Callable:
    """``advance(chunk_index)`` → the ``(stage, done, total)`` callback of :func:`compute_chunk` that
    reports on ``progress`` over all ``chunks`` chunks of every stage's steps."""
    lengths = (settings.steps, settings.decompose_steps, settings.refine_steps)
    per_chunk = sum(lengths)

    def advance(index: int):
        def show(stage: int, done: int, total: int):
            before = index * per_chunk + sum(lengths[:stage - 1])
            progress(layer, before + done * lengths[stage - 1] // total, chunks * per_chunk, stage)
        return show

    return advance


def sweep_layer(store: Store, model, params, layer: str, channels: Sequence[int], settings: Settings,
                chunk: int, out: Path, log: Log | None = None, progress: Progress | None = None,
                memory_budget: int | None = None) -> int:
    """Computes and stores every kernel of ``channels`` that ``store`` does not hold yet, ``chunk``
    kernels per batch, writing each kernel's pictures under ``out/layer/``; returns how many.

    Files in the layer's folder that are not usable kernel files are reported to ``log``
    (one message per call), steps done to ``progress`` (:data:`Progress`).
    """
    log = log or (lambda message: None)
    audit = store.audit(layer, kernel_schema(video_shape(model, settings), settings.refine_steps > 0))
    for problem in audit.problems:
        log(f"warning: {problem}")
    pending = [c for c in channels if c not in audit.done]
    batches = [pending[i:i + chunk] for i in range(0, len(pending), chunk)]
    advance = _stage_progress(layer, len(batches), settings, progress) if progress else lambda index: None
    for index, batch in enumerate(batches):
        for channel, record in compute_chunk(model, params, layer, batch, settings, advance(index),
                                                   memory_budget).items():
            write_media(output_path(out, layer), model.name, layer, channel, record)
            store.write(layer, channel, record)
    return len(pending)


def _mean(values) -> float:
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def build_layer_page(store: Store, model, layer: str, wanted: int, settings: Settings, out: Path) -> gallery.LayerView:
    """Writes ``layer``'s page and figures from the kernels ``store`` holds (re-drawing any missing
    picture from its record); ``wanted``: how many kernels of the layer were asked for."""
    schema = kernel_schema(video_shape(model, settings), settings.refine_steps > 0)
    done = sorted(store.audit(layer, schema).done)
    records = {c: store.read(layer, c, schema) for c in done}
    folder = output_path(out, layer)
    labels = model.names_of(layer)
    kernels = []
    for c, r in records.items():
        names = media_names(model.name, layer, c)
        if settings.refine_steps:
            names.update(refined_media_names(model.name, layer, c))
        if not all((folder / name).is_file() for name in names.values()):
            write_media(folder, model.name, layer, c, r)
        kernels.append(gallery.KernelView(
            channel=c, objective=float(r["objective"]), direction_deg=float(r["direction_deg"]),
            speed=float(r["speed"]), psnr=float(r["psnr"]),
            media={kind: f"{layer}/{name}" for kind, name in names.items()},
            reliability=float(r["reliability"]), reliable=bool(r["reliable"]), dead=bool(r["dead"]),
            aliased=bool(r["aliased"]), failed=int(r["failed"]), name=labels[c] if labels else "",
        ))
    title = f"{model.name} {layer}"
    figures = {}
    if records:
        sheet = gallery.save_figure(
            gallery.contact_sheet([r["static"] for r in records.values()], done, f"{title}: static textures",
                                  [labels[c] for c in done] if labels else ()),
            output_path(folder, f"{model.name}_{layer}_statics.png"))
        hist = gallery.save_figure(
            gallery.motion_histogram([r["direction_deg"] for r in records.values()],
                                     [r["speed"] for r in records.values()], f"{title}: motion"),
            output_path(folder, f"{model.name}_{layer}_motion.png"))
        figures = {"static textures": f"{layer}/{sheet.name}", "directions and speeds": f"{layer}/{hist.name}"}
    notes = [f"{len(done)} of {max(wanted, len(done))} kernels finished"] if len(done) < wanted else []
    if layer in model.linear_layers:
        notes.append(f"{layer}'s output is linear in the input, so the optimum of a channel's mean would be a flat "
                     "colour: its channels are shown rectified (maximised after a ReLU)"
                     if settings.rectified(model, layer) else
                     f"{layer}'s output is linear in the input, so the optimum of a channel's mean is a flat colour")
    refined = f", {settings.refine_steps} refinement steps ({settings.refine_motion} motion)" if settings.refine_steps else ""
    subtitle = (f"{settings.preset} preset{', rectified' if settings.rectified(model, layer) else ''}, "
                f"{settings.steps} stage-1 "
                f"steps, {settings.decompose_steps} decomposition steps"
                f"{refined}, seed {settings.seed}")
    page = gallery.write_page(output_path(out, f"{layer}.html"), gallery.layer_page(f"{title}: {subtitle}", kernels, figures, notes))
    return gallery.LayerView(layer=layer, page=page.name, figures=figures, done=len(done), total=max(wanted, len(done)),
                             mean_psnr=_mean([k.psnr for k in kernels]), mean_speed=_mean([k.speed for k in kernels]),
                             reliable=sum(k.reliable for k in kernels), dead=sum(k.dead for k in kernels))


def visualize(model, params, layers: Sequence[str], channels: str, out, settings: Settings, chunk: int,
              log: Log | None = None, progress: Progress | None = None,
              memory_budget: int | None = None) -> Path:
    """Runs (or resumes) the sweep of ``channels`` (``"all"``, ``"0-15"``, ``"3,7"``) of each of
    ``layers`` into run folder ``out``, then writes the gallery; returns the index page's path.

    Notes and warnings about the folder's contents go to ``log`` (one message per call), steps
    done to ``progress`` (:data:`Progress`); nothing is printed. ``memory_budget``: bytes per
    device each stage's batches may use (default: the runner's).
    """
    log = log or (lambda message: None)
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 kernel, got {chunk}")
    if settings.model != model.name:
        raise ValueError(f"settings are for model {settings.model}, not {model.name}")
    layers = [model.check_layer(layer) for layer in layers]
    wanted = {layer: parse_channels(channels, model.num_channels(params, layer), layer, model.names_of(layer))
              for layer in layers}
    out = Path(out)
    with Store.open(out, run_config(model, settings), params_checksum(params)) as store:
        for note in store.notes:
            log(f"note: {note}")
        for problem in store.leftovers + store.foreign_entries(model.layers):
            log(f"warning: {problem}")
        for layer in layers:
            if not sweep_layer(store, model, params, layer, wanted[layer], settings, chunk, out, log, progress,
                               memory_budget):
                log(f"{model.name} {layer}: all {len(wanted[layer])} kernels already in {out}")
        # The index covers every layer of the run folder, also those of earlier invocations.
        shown = [layer for layer in model.layers if layer in wanted or layer in store.layers()]
        views = [build_layer_page(store, model, layer, len(wanted.get(layer, ())), settings, out) for layer in shown]
        return gallery.write_page(output_path(out, "index.html"),
                                  gallery.index_page(f"{model.name}: what its kernels respond to", views))
