"""``kv3d visualize``: every chosen kernel through stage 1, stage 2 (and stage 3) and the writers,
into a resumable results store (:mod:`kv3d_jax.store`), then the gallery (:mod:`kv3d_jax.gallery`).

The data path, top to bottom: a :class:`~kv3d_jax.job.Job` and the wanted kernels → the kernels
the run folder does not hold yet → a plan (:mod:`kv3d_jax.plan`) that deals them to the
processes in units of ``job.batch`` kernels per local device → per unit, one batched call of
each stage (:func:`compute_chunk`) → each kernel's record and pictures → once every process's
share is done, the gallery.

A kernel's arrays are a function of the model, its params, the layer, the channel and the job
alone: its keys come from ``(seed, layer, channel)``, every stage runs it in a batch of exactly
``job.batch`` kernels per device (padded), and the read-out runs kernel by kernel, so
neither the device count, the process count, the channel subset, its batch-mates nor a resume
changes a bit of it on one backend. A kernel that turns non-finite in a stage is stored as
failed (``failed``: the stage's number) and changes no other kernel's result.

Under ``jax.distributed`` every process runs :func:`visualize` with the same arguments: process
0 opens the run folder (its lock, ``run.json``, the audit of existing kernel files), every process
then takes its share of the pending kernels of every layer, balanced by cost, and writes its
kernels' files into the shared folder; process 0 writes the gallery when all shares are done.
A killed process loses only the unit it was computing; a run started on N processes resumes on M.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import time
import zlib
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kv3d_jax import distribute, diversity, gallery, maximization, plan, reliability, runner, slowfast, writers
from kv3d_jax.decomposition import decompose
from kv3d_jax.job import Job
from kv3d_jax.maximization import maximize
from kv3d_jax.motion import motion_summary, observability
from kv3d_jax.record import KernelRecord
from kv3d_jax.refinement import refine
from kv3d_jax.store import Store, params_checksum
from kv3d_jax.untrusted import output_path

# Width (px) of the frame border the motion read-out leaves out (motion.motion_summary's default).
_BORDER = 2

Log = Callable[[str], None]
# progress(layer, done, total, stage): ``done`` of the ``total`` steps of this process's units of
# ``layer`` (every unit's stage-1, stage-2, stage-3, slow/fast and diverse steps, :meth:`Job.steps_per_kernel`)
# are finished; ``stage`` is running (4: the penalised stage 1 of the slow/fast index; 5: the diverse optima).
Progress = Callable[[str, int, int, int], None]


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


def layer_key(seed: int, layer: str) -> jax.Array:
    """The PRNG key of ``layer``'s kernels, from the seed and the layer's name."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(layer.encode()) & 0x7FFFFFFF)


def compute_chunk(model, params, layer: str, channels: Sequence[int], job: Job,
                  progress=None) -> dict[int, dict[str, np.ndarray]]:
    """Stage 1, stage 2, the motion read-out (and stage 3, the slow/fast index and the diverse optima) of
    ``channels`` of ``layer``: ``{channel: arrays}`` with the arrays of ``job.record(model).arrays()``.

    Stage 1 folds each channel into ``fold_in(layer key, 1)``; stage 2 gets
    ``fold_in(fold_in(layer key, 2), channel)`` per kernel; stage 3 starts from stage 2's
    result with ``fold_in(layer key, 3)``; the slow/fast index's penalised stage 1
    (:func:`kv3d_jax.slowfast.penalised`, weight ``job.slowfast``) uses stage 1's keys, so each
    kernel's penalised run is paired with its stage 1, whose objective is the index's unpenalised
    one. The ``job.diversity`` diverse optima (:func:`kv3d_jax.diversity.maximize_diverse`, its default
    settings, ``job.diverse``'s config: stage 1's with the diverse run's steps) fold each channel into
    ``fold_in(layer key, 6)``. Every stage runs ``job.batch`` kernels per device.
    ``progress(stage, done, total)`` is called as steps finish (stage 4: the slow/fast index's run, 5:
    the diverse optima's). A record's ``failed`` is 0, or the number of the first of stages 1-3 whose
    result for the kernel is not finite; a kernel whose slow/fast or diverse run is not finite has NaN
    in that run's arrays instead (its stages 1-3 are still worth showing); its trust fields
    come from :func:`kv3d_jax.motion.motion_summary` with stage 1's objective against random
    videos drawn with ``fold_in(layer key, 4)``. A record with attribution maps gets each
    kernel's from ``fold_in(fold_in(layer key, 5), channel)``.
    """
    key = layer_key(job.seed, layer)
    common = dict(per_device=job.batch, compute_dtype=jnp.dtype(job.dtype))
    channels = [int(c) for c in channels]

    def report(stage):
        return None if progress is None else lambda done, total, _: progress(stage, done, total)

    config = job.stage1(model, layer)
    stage1 = maximize(model, params, layer, channels, key=jax.random.fold_in(key, 1), callback=report(1),
                      config=config, share=False, **common)
    dec = decompose(stage1.videos, channels, config=job.stage2(), key=jax.random.fold_in(key, 2),
                    callback=report(2), **common)
    targets = np.asarray(channels, np.int64)
    random = reliability.baseline(model, params, layer, targets, jax.random.fold_in(key, 4), config,
                                  compute_dtype=common["compute_dtype"])
    peak = reliability.peak(model, params, layer, targets, stage1.videos, config, common["compute_dtype"])

    summary = motion_summary(dec, border=_BORDER, objective=stage1.objective, baseline=random, peak=peak)
    gain = reliability.gain(stage1.objective, random)
    failed = np.where(stage1.failed, 1, np.where(dec.failed, 2, 0))
    arrays = {
        "video": stage1.videos, "objective": stage1.objective, "static": dec.static,
        "displacement": dec.displacement,
        "direction_deg": summary.direction_deg, "speed": summary.speed, "psnr": summary.psnr,
        "reliability": summary.reliability, "reliable": summary.reliable, "aliased": summary.aliased,
        "dead": reliability.dead(peak, gain), "gain": gain, "explained": summary.explained,
    }
    record = job.record(model)
    if record.attribution:
        # One kernel at a time (kernel_batch=1), so that a map does not depend on its batch-mates.
        arrays["attribution"] = maximization.attribution(
            model, params, layer, config, stage1.videos, targets,
            runner.kernel_keys(jax.random.fold_in(key, 5), targets),
            kernel_batch=1, compute_dtype=common["compute_dtype"])
    stage3 = job.stage3(model, layer)
    if stage3 is not None:
        refined = refine(model, params, layer, dec, channels, config=stage3, key=jax.random.fold_in(key, 3),
                         callback=report(3), **common)
        motion = motion_summary(refined, border=_BORDER)
        failed = np.where(failed == 0, np.where(refined.failed, 3, 0), failed)
        arrays.update(refined_video=refined.video, refined_static=refined.static,
                      refined_displacement=refined.displacement, refined_objective=refined.objective,
                      refined_direction_deg=motion.direction_deg, refined_speed=motion.speed)
    if job.slowfast:
        penalised, _, penalised_failed = slowfast.penalised(
            model, params, layer, channels, job.slowfast, config=config, key=jax.random.fold_in(key, 1),
            callback=report(4), **common)
        arrays["slowness"] = slowfast.slowness(np.stack([np.asarray(stage1.objective), penalised], axis=1),
                                               np.stack([np.asarray(stage1.failed), penalised_failed], axis=1))
    if job.diversity:
        diverse = diversity.maximize_diverse(model, params, layer, channels, job.diversity,
                                             config=job.diverse(model, layer),
                                             key=jax.random.fold_in(key, 6), callback=report(5), share=False,
                                             **common)
        # A failed kernel's diverse arrays are NaN whole, so that its record says so by itself.
        bad = np.asarray(diverse.failed)
        arrays.update({f"diverse_{name}": np.where(bad.reshape(-1, *[1] * (np.ndim(value) - 1)), np.nan, value)
                       for name, value in (("video", diverse.videos), ("objective", diverse.objective),
                                           ("cosine", diverse.cosine))})
    arrays["failed"] = failed
    arrays = record.stored(arrays)
    return {c: {name: value[i] for name, value in arrays.items()} for i, c in enumerate(channels)}


@jax.jit
def _read_out_support(static, displacement):
    """Where the motion read-out averages velocities ``(T-1, H, W)``: drawn in colour, the rest grey."""
    return observability(static, displacement, _BORDER) > 0


def write_media(folder: Path, model: str, layer: str, channel: int, arrays: Mapping[str, np.ndarray],
                record: KernelRecord) -> None:
    """Writes kernel ``(layer, channel)``'s pictures (SPEC §4) into ``folder`` from its ``arrays``,
    named by ``record`` (its refinement's and diverse optima's too, where the record has them). A failed
    kernel's non-finite values are drawn as 0."""
    arrays = {name: np.nan_to_num(np.asarray(value, np.float32)) for name, value in arrays.items()}
    stem = writers.kernel_stem(model, layer, channel)
    valid = np.asarray(_read_out_support(arrays["static"], arrays["displacement"]))
    written = writers.save_decomposition(folder, stem, arrays["video"], arrays["static"], arrays["displacement"],
                                         record.reconstruction(arrays), valid=valid, media=record.media)
    if record.attribution:
        written.update(writers.save_attribution(folder, stem, arrays["video"], arrays["attribution"],
                                                media=record.media))
    if record.refined:
        valid = np.asarray(_read_out_support(arrays["refined_static"], arrays["refined_displacement"]))
        written.update(writers.save_refinement(folder, stem, arrays["refined_video"], arrays["refined_static"],
                                               arrays["refined_displacement"], valid=valid, media=record.media))
    if record.diversity:
        written.update(writers.save_diverse(folder, stem, arrays["diverse_video"], media=record.media))
    names = record.files(model, layer, channel)
    if {kind: path.name for kind, path in written.items()} != names:
        raise RuntimeError(f"the writers named their files {written}, not {names}")


def _stage_progress(layer: str, units: int, job: Job, progress: Progress) -> Callable:
    """``advance(unit_index)`` → the ``(stage, done, total)`` callback of :func:`compute_chunk` that
    reports on ``progress`` over all ``units`` units of ``layer``."""
    lengths = (job.steps, job.decompose_steps, job.refine_steps, job.slowfast_steps(), job.diversity_cost())
    per_unit = sum(lengths)

    def advance(index: int):
        def show(stage: int, done: int, total: int):
            before = index * per_unit + sum(lengths[:stage - 1])
            progress(layer, before + done * lengths[stage - 1] // total, units * per_unit, stage)
        return show

    return advance


def kernel_flops(model, params, job: Job, layers: Sequence[str]) -> dict[str, float]:
    """Estimated FLOPs of one kernel of each of ``layers``: its stage-1, stage-3, slow/fast and diverse
    steps (:func:`kv3d_jax.plan.stage1_step_flops`, one per optimum per diverse step); stage 2 does not
    touch the model and costs the same for every layer of a job."""
    steps = job.steps + job.refine_steps + job.slowfast_steps() + job.diversity_cost()
    return {layer: steps * plan.stage1_step_flops(model, params, layer, job.stage1(model, layer), job.dtype)
            for layer in layers}


def check_memory(model, params, job: Job, layers: Sequence[str], budget: int) -> None:
    """Raises MemoryError if a stage-1 batch of ``job.batch`` kernels per device of any of ``layers``
    (or, with diverse optima, a batch of the diverse run, ``job.diversity`` videos per kernel) needs more
    than ``budget`` bytes per device (XLA's memory analysis, scaled on CPU by
    :func:`kv3d_jax.distribute.analysis_undercount`), naming the layer and the fix."""
    mesh = distribute.kernel_mesh()
    dtype = jnp.dtype(job.dtype)
    for layer in layers:
        config = job.stage1(model, layer)
        programs = {"": (config, maximization.problem(model, layer, config, job.video_shape(model), dtype))}
        if job.diversity:
            # compute_chunk's run: maximize_diverse at its default settings, which are problem's too.
            diverse = job.diverse(model, layer)
            programs[f" with {job.diversity} diverse optima each"] = (diverse, diversity.problem(
                model, layer, diverse, job.video_shape(model), job.diversity, diversity.DEFAULT_WEIGHT,
                compute_dtype=dtype))
        for what, (settings, problem) in programs.items():
            length = runner.chunk_length(settings.steps, settings.chunk, problem, mesh)
            compiled = runner.compiled_chunk(problem, params, jnp.zeros((1,), jnp.int32), job.batch, length, mesh,
                                             dtype)
            used = distribute.analysis_undercount(mesh) * distribute.program_bytes(compiled)
            if used > budget:
                fix = ", a smaller --diversity" if what else ""
                raise MemoryError(f"a batch of {job.batch} kernels of {model.name} {layer}{what} needs "
                                  f"{used / 2**30:.2f} GiB per device, over the budget of {budget / 2**30:.2f} GiB; "
                                  f"use a smaller --batch (it is part of the run's settings){fix} or --dtype bfloat16")


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min" if seconds >= 3600 else \
        f"{seconds // 60} min {seconds % 60:02d} s"


@dataclasses.dataclass(frozen=True)
class Speed:
    """What a process measured on its first units: seconds per FLOP of the stages that run the
    model (1, 3, the slow/fast index's and the diverse optima's) and seconds per kernel of everything
    else (stage 2, the read-out, the pictures, the store), which costs the same for every layer of a job."""

    per_flop: float
    per_kernel: float

    def seconds(self, kernels: int, flops: float) -> float:
        """Estimated seconds for ``kernels`` kernels of ``flops`` FLOPs in all."""
        return flops * self.per_flop + kernels * self.per_kernel


def plan_table(model, job: Job, pending: Mapping[str, Sequence[int]], flops: Mapping[str, float],
               speed: Speed | None = None) -> str:
    """The plan as a person reads it: per layer, the kernels still to compute, their steps and
    estimated FLOPs (``flops``: per kernel), and, given a measured ``speed``, the estimated time."""
    rows = [f"{'layer':<16} {'kernels':>7} {'steps/kernel':>12} {'TFLOP':>10}" + ("  est. time" if speed else "")]
    kernels, total = 0, 0.0
    for layer, channels in pending.items():
        cost = len(channels) * flops[layer]
        kernels, total = kernels + len(channels), total + cost
        est = f"  {_duration(speed.seconds(len(channels), cost))}" if speed else ""
        rows.append(f"{layer:<16} {len(channels):>7} {job.steps_per_kernel():>12} {cost / 1e12:>10.3g}{est}")
    est = f"  {_duration(speed.seconds(kernels, total))}" if speed else ""
    rows.append(f"{'all':<16} {kernels:>7} {'':>12} {total / 1e12:>10.3g}{est}")
    return "\n".join(rows)


class _Clock:
    """Seconds spent in the stages that run the model (1, 3, 4 and 5: the slow/fast index's and the diverse
    optima's) and in all, from the progress callbacks of :func:`compute_chunk` (each chunk's time goes to
    the stage it reports)."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.model = 0.0

    def unit(self) -> None:
        self.last = time.perf_counter()

    def tick(self, stage: int) -> None:
        now = time.perf_counter()
        if stage in (1, 3, 4, 5):
            self.model += now - self.last
        self.last = now

    def speed(self, kernels: int, flops: float) -> Speed:
        other = time.perf_counter() - self.start - self.model
        return Speed(self.model / flops if flops else 0.0, other / kernels)


def sweep(store: Store, model, params, job: Job, units: Sequence[plan.Unit], out: Path, log: Log | None = None,
          progress: Progress | None = None) -> int:
    """Computes and stores the kernels of ``units`` (this process's share), unit by unit, writing
    each kernel's pictures under ``out/layer/``; returns how many kernels. After the first unit,
    ``log`` gets the estimated time of each layer's rest, after each later one the time left, both
    at the :class:`Speed` measured so far."""
    log = log or (lambda message: None)
    record = job.record(model)
    total, all_kernels = sum(unit.flops for unit in units), sum(len(unit.channels) for unit in units)
    per_layer = {layer: [u for u in units if u.layer == layer] for layer in dict.fromkeys(u.layer for u in units)}
    clock, done, kernels = _Clock(), 0.0, 0
    for layer, mine in per_layer.items():
        advance = _stage_progress(layer, len(mine), job, progress) if progress else lambda index: None
        for index, unit in enumerate(mine):
            clock.unit()
            report = advance(index)

            def timed(stage, done_steps, total_steps, report=report):
                clock.tick(stage)
                if report is not None:
                    report(stage, done_steps, total_steps)

            for channel, arrays in compute_chunk(model, params, layer, unit.channels, job, timed).items():
                write_media(output_path(out, layer), model.name, layer, channel, arrays, record)
                store.write(layer, channel, arrays)
            done += unit.flops
            kernels += len(unit.channels)
            if kernels >= all_kernels:
                continue
            speed = clock.speed(kernels, done)
            if kernels == len(unit.channels):
                rest = {}
                for later in units[units.index(unit) + 1:]:
                    rest.setdefault(later.layer, []).extend(later.channels)
                flops = {u.layer: u.flops / len(u.channels) for u in units}
                log(f"{_process()}measured on the first {kernels} kernels, the rest of this process's share:\n"
                    + plan_table(model, job, rest, flops, speed))
            else:
                left = speed.seconds(all_kernels - kernels, total - done)
                log(f"{_process()}{kernels} of {all_kernels} kernels done, about {_duration(left)} left")
    return kernels


def _process() -> str:
    """``"process i of n: "`` under ``jax.distributed``, else nothing."""
    return f"process {jax.process_index()} of {jax.process_count()}: " if jax.process_count() > 1 else ""


def _finite(values) -> np.ndarray:
    values = np.asarray(values, np.float64)
    return values[np.isfinite(values)]


def _mean(values) -> float:
    values = _finite(values)
    return float(values.mean()) if values.size else float("nan")


def _median(values) -> float:
    values = _finite(values)
    return float(np.median(values)) if values.size else float("nan")


def build_layer_page(store: Store, model, layer: str, wanted: int, job: Job, out: Path) -> gallery.LayerView:
    """Writes ``layer``'s page and figures from the kernels ``store`` holds (re-drawing any missing
    picture from its record); ``wanted``: how many kernels of the layer were asked for."""
    record = job.record(model)
    done = sorted(store.audit(layer, record.arrays()).done)
    arrays = {c: store.read(layer, c, record.arrays()) for c in done}
    folder = output_path(out, layer)
    labels = model.names_of(layer)
    kernels = []
    for c, a in arrays.items():
        files = record.files(model.name, layer, c)
        if not all((folder / name).is_file() for name in files.values()):
            write_media(folder, model.name, layer, c, a, record)
        kernels.append(record.view(layer, c, a, {kind: f"{layer}/{name}" for kind, name in files.items()},
                                   labels[c] if labels else ""))
    title = f"{model.name} {layer}"
    figures = {}
    if arrays:
        sheet = gallery.save_figure(
            gallery.contact_sheet([a["static"] for a in arrays.values()], done, f"{title}: static textures",
                                  [labels[c] for c in done] if labels else ()),
            output_path(folder, f"{model.name}_{layer}_statics.png"))
        hist = gallery.save_figure(
            gallery.motion_histogram([a["direction_deg"] for a in arrays.values()],
                                     [a["speed"] for a in arrays.values()], f"{title}: motion"),
            output_path(folder, f"{model.name}_{layer}_motion.png"))
        figures = {"static textures": f"{layer}/{sheet.name}", "directions and speeds": f"{layer}/{hist.name}"}
    notes = [f"{len(done)} of {max(wanted, len(done))} kernels finished"] if len(done) < wanted else []
    if layer in model.linear_layers:
        notes.append(f"{layer}'s output is linear in the input, so the optimum of a channel's mean would be a flat "
                     "colour: its channels are shown rectified (maximised after a ReLU)"
                     if job.rectified(model, layer) else
                     f"{layer}'s output is linear in the input, so the optimum of a channel's mean is a flat colour")
    page = gallery.write_page(output_path(out, f"{layer}.html"),
                              gallery.layer_page(f"{title}: {job.describe(model, layer)}", kernels, figures, notes))
    return gallery.LayerView(layer=layer, page=page.name, figures=figures, done=len(done), total=max(wanted, len(done)),
                             mean_psnr=_mean([k.psnr for k in kernels]), mean_speed=_mean([k.speed for k in kernels]),
                             reliable=sum(k.reliable for k in kernels), dead=sum(k.dead for k in kernels),
                             median_slowness=_median([k.slowness for k in kernels]))


def build_gallery(store: Store, model, job: Job, out, wanted: Mapping[str, int] | None = None) -> Path:
    """Writes the gallery of run folder ``out`` from what ``store`` holds: a page per layer that has
    kernels (or is in ``wanted``, layer → kernels asked for) and the index; returns the index's path."""
    out = Path(out)
    wanted = dict(wanted or {})
    shown = [layer for layer in model.layers if layer in wanted or layer in store.layers()]
    views = [build_layer_page(store, model, layer, wanted.get(layer, 0), job, out) for layer in shown]
    return gallery.write_page(output_path(out, "index.html"),
                              gallery.index_page(f"{model.name}: what its kernels respond to", views))


def visualize(model, params, job: Job, layers: Sequence[str], channels: str = "all", out="kv3d_out",
              log: Log | None = None, progress: Progress | None = None, chunk: int | None = None) -> Path | None:
    """Runs (or resumes) ``job`` on ``channels`` (``"all"``, ``"0-15"``, ``"3,7"``) of each of
    ``layers`` into run folder ``out``, then writes the gallery; returns the index page's path
    (None on a process other than 0 of a ``jax.distributed`` run, which writes no gallery).

    Every process of a ``jax.distributed`` run calls it with the same arguments (see the module
    doc). Notes, warnings, the plan and the time left go to ``log`` (one message per call), steps
    done to ``progress`` (:data:`Progress`); nothing is printed. ``chunk``: kernels a process
    computes and stores together, rounded up to ``job.batch`` on every local device (default one
    such batch); results do not depend on it.
    """
    log = log or (lambda message: None)
    if job.model != model.name:
        raise ValueError(f"the job is for model {job.model}, not {model.name}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be at least 1 kernel, got {chunk}")
    layers = [model.check_layer(layer) for layer in layers]
    wanted = {layer: parse_channels(channels, model.num_channels(params, layer), layer, model.names_of(layer))
              for layer in layers}
    out, record = Path(out), job.record(model)
    first = jax.process_index() == 0
    config, checksum = job.config(model), params_checksum(params)
    store = Store.open(out, config, checksum) if first else None
    try:
        if first:
            for note in store.notes:
                log(f"note: {note}")
            for problem in store.leftovers + store.foreign_entries(model.layers):
                log(f"warning: {problem}")
            for layer in layers:
                for problem in store.audit(layer, record.arrays()).problems:
                    log(f"warning: {problem}")
        # Every process lists the finished kernels only once process 0 has checked them all, and
        # none writes before all have listed them: they all derive the same plan.
        distribute.barrier("kv3d visualize: run folder checked")
        store = store or Store.join(out, config, checksum)
        finished = {layer: store.finished(layer) for layer in layers}
        pending = {layer: [c for c in wanted[layer] if c not in finished[layer]] for layer in layers}
        distribute.barrier("kv3d visualize: finished kernels listed")
        for layer in layers:
            if not pending[layer] and first:
                log(f"{model.name} {layer}: all {len(wanted[layer])} kernels already in {out}")
        pending = {layer: channels for layer, channels in pending.items() if channels}
        flops = kernel_flops(model, params, job, list(pending))
        # The same width in every process (the global device count over the process count), so
        # that they all cut the same units.
        width = job.batch * max(1, jax.device_count() // jax.process_count())
        width = width * -(-(chunk or width) // width)
        shares = plan.deal(plan.units(pending, width, flops), jax.process_count())
        if pending and first:
            log(f"plan: {sum(map(len, pending.values()))} kernels on {jax.process_count()} process(es) × "
                f"{jax.local_device_count()} {jax.devices()[0].platform} device(s), {job.batch} per device per "
                f"batch\n{plan_table(model, job, pending, flops)}")
        sweep(store, model, params, job, shares[jax.process_index()], out, log, progress)
        distribute.barrier("kv3d visualize: every share done")
        if not first:
            return None
        return build_gallery(store, model, job, out, {layer: len(c) for layer, c in wanted.items()})
    finally:
        if store is not None:
            store.close()
