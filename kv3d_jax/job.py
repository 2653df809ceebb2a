"""A ``kv3d visualize`` job: every setting a run's results depend on, resolved once.

A :class:`Job` is built in one place, from the command line's flags, from Python
(:meth:`Job.create`) or from a run folder's ``run.json`` (:meth:`Job.from_config`), and
everything downstream reads its resolved stage configs (:meth:`Job.stage1`,
:meth:`Job.stage2`, :meth:`Job.stage3`) and its kernel record (:meth:`Job.record`): preset
names are looked up here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping

from kv3d_jax import decomposition, maximization, refinement
from kv3d_jax.maximization import get_preset
from kv3d_jax.models import motionnet
from kv3d_jax.record import MEDIA, KernelRecord
from kv3d_jax.refinement import MOTIONS

DEFAULT_MODEL = "motionnet"
# `kv3d visualize` with no arguments: all 176 channels of the embedded MotionNet's conv layers.
# The step counts trade agreement with the channels' grating tuning against a job of at most
# 5 minutes on 2 CPU cores; README.md ("Do the visualisations tell the truth?") has both
# measurements. Stage 1 dominates the time: re-measure when its speed changes.
DEFAULT_LAYERS = motionnet.CONV_LAYERS
DEFAULT_OUT = "kv3d_out"
DEFAULTS = {DEFAULT_MODEL: {"preset": "native", "steps": 40, "decompose_steps": 200}}
# Every other model: the paper preset with its steps, and the reference's decomposition steps (SPEC §3).
OTHER_MODELS = {"preset": "paper", "decompose_steps": 2000}
# The dtypes a model may run in.
DTYPES = ("float32", "bfloat16")
# The parameterizations stage 1 of a job may use: those that describe every frame freely.
STAGE1_PARAMETERIZATIONS = ("pixel", "fourier", "maco")
# Kernels per device in one compiled batch: wide enough to keep a CPU's cores busy, small
# enough that a MotionNet or C3D layer pads at most a few kernels.
DEFAULT_BATCH = 8
# Settings added after run folders were first written, with the value that means "not used": a
# run.json records one only when it is used, and one that lacks it reads back as not using it, so
# folders written before the setting existed open, resume and draw as they did.
LATER_SETTINGS = {"slowfast": 0.0, "diversity": 0, "diversity_steps": 0}
# The most diverse optima per kernel (each kernel holds all N videos in one batch).
MAX_DIVERSITY = 64
# The fewest steps a diverse run gets from Job.create: at 40 steps 1 of MotionNet conv3's 8 kernels
# had distinct optima, at 300 steps 7 of 8 (docs/diversity.md).
DIVERSITY_STEPS = 300


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything a kernel's result depends on besides the model params, and how it is drawn.

    Attributes:
      model: registry name of the model.
      preset: stage-1 preset name (:data:`kv3d_jax.maximization.PRESETS`).
      steps: stage-1 optimisation steps.
      decompose_steps: stage-2 optimisation steps.
      seed: the seed every kernel's PRNG keys are derived from.
      rectify: maximise the activation after a ReLU (SPEC §5) rather than the layer's output.
      refine_steps: steps of the texture-plus-motion refinement (stage 3, :mod:`kv3d_jax.refinement`),
        started from each decomposition; 0 skips it.
      refine_motion: the motion the refinement may use (:attr:`kv3d_jax.refinement.Config.motion`).
      dtype: the dtype the model runs in, ``"float32"`` or ``"bfloat16"``.
      rectify_linear: rectify the layers whose output is linear in the input (``model.linear_layers``),
        whose channel mean would otherwise peak at a flat colour (SPEC §5).
      batch: kernels per device in every compiled batch of every stage. A kernel's arrays are
        bit-identical on one backend for any device count, process count, channel subset or
        resume as long as ``batch`` is the same (another batch shape may pick other convolution
        algorithms); memory bounds it (a batch that does not fit is an error naming the fix).
      media: the format of the moving pictures (:data:`kv3d_jax.record.MEDIA`).
      parameterization: how stage 1 represents a video (:data:`kv3d_jax.parameterizations.PARAMETERIZATIONS`:
        ``pixel``, ``fourier`` or ``maco``, the phase of a spectrum whose magnitude follows the
        natural-video law, :mod:`kv3d_jax.spectrum`). With ``maco`` the refinement's texture is a
        MACO phase too (:attr:`kv3d_jax.refinement.Config.texture`) and every kernel gets an
        attribution map (:attr:`kv3d_jax.record.KernelRecord.attribution`).
      slowfast: the temporal-variation penalty weight λ (1/TV units, :mod:`kv3d_jax.slowfast`) of each
        kernel's slow/fast index, its stage-1 objective under that penalty over its unpenalised one
        (high = slow); 0 computes no index. The penalised run is a second stage 1 of ``steps`` steps.
      diversity: N diverse optima per kernel (:mod:`kv3d_jax.diversity`, its default settings), 2 to
        :data:`MAX_DIVERSITY`, drawn side by side in the gallery; 0 computes none. The diverse run is a
        stage 1 of ``diversity_steps`` steps for N videos at once, so it costs about N such stage-1 runs.
      diversity_steps: the diverse run's steps; 0 means stage 1's ``steps`` (what run folders written
        before the setting existed used), and ``steps`` itself is kept as 0, so that such a folder
        resumes under a job that names them. Only with ``diversity``.
    """

    model: str
    preset: str
    steps: int
    decompose_steps: int
    seed: int = 0
    rectify: bool = False
    refine_steps: int = 0
    refine_motion: str = refinement.Config.motion
    dtype: str = "float32"
    rectify_linear: bool = True
    batch: int = DEFAULT_BATCH
    media: str = MEDIA[0]
    parameterization: str = "pixel"
    slowfast: float = LATER_SETTINGS["slowfast"]
    diversity: int = LATER_SETTINGS["diversity"]
    diversity_steps: int = LATER_SETTINGS["diversity_steps"]

    def __post_init__(self):
        get_preset(self.preset)
        for name in ("steps", "decompose_steps", "batch"):
            if not isinstance(getattr(self, name), numbers.Integral) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer of at least 1, got {getattr(self, name)!r}")
        if not isinstance(self.refine_steps, numbers.Integral) or self.refine_steps < 0:
            raise ValueError(f"refine_steps must be at least 1 (or 0 for no refinement), got {self.refine_steps!r}")
        if (not isinstance(self.slowfast, numbers.Real) or isinstance(self.slowfast, bool)
                or not 0 <= self.slowfast < float("inf")):
            raise ValueError(f"slowfast must be a penalty weight of at least 0 (0: no slow/fast index), got "
                             f"{self.slowfast!r}")
        if (not isinstance(self.diversity, numbers.Integral) or isinstance(self.diversity, bool)
                or not (self.diversity == 0 or 2 <= self.diversity <= MAX_DIVERSITY)):
            raise ValueError(f"diversity must be 0 (no diverse optima) or 2 to {MAX_DIVERSITY} optima per kernel, got "
                             f"{self.diversity!r}")
        if (not isinstance(self.diversity_steps, numbers.Integral) or isinstance(self.diversity_steps, bool)
                or self.diversity_steps < 0):
            raise ValueError(f"diversity_steps must be an integer of at least 1 (or 0 for stage 1's steps), got "
                             f"{self.diversity_steps!r}")
        if self.diversity_steps and not self.diversity:
            raise ValueError("diversity_steps are the steps of the diverse optima's run; set diversity to 2 or more "
                             "optima per kernel, or leave diversity_steps at 0")
        if self.diversity_steps == self.steps:
            object.__setattr__(self, "diversity_steps", 0)
        if not isinstance(self.seed, numbers.Integral) or not -2**63 <= self.seed < 2**63:
            raise ValueError(f"seed must be a 64-bit signed integer, got {self.seed!r}")
        for name, valid in (("refine_motion", MOTIONS), ("dtype", DTYPES), ("media", MEDIA),
                            ("parameterization", STAGE1_PARAMETERIZATIONS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; valid ones are: {', '.join(valid)}")

    @classmethod
    def create(cls, model: str | None = None, preset: str | None = None, steps: int | None = None,
               decompose_steps: int | None = None, **settings) -> "Job":
        """A job for ``model`` (default :data:`DEFAULT_MODEL`) with every setting not given filled
        in: from :data:`DEFAULTS` for its model (``steps`` only at its default preset), else
        :data:`OTHER_MODELS` and the preset's steps, and with ``diversity`` a diverse run of stage 1's
        steps but at least :data:`DIVERSITY_STEPS`; ``settings``: any other field."""
        model = model or DEFAULT_MODEL
        defaults = DEFAULTS.get(model, OTHER_MODELS)
        preset = preset or defaults["preset"]
        if steps is None:
            steps = defaults["steps"] if "steps" in defaults and preset == defaults["preset"] else get_preset(preset).steps
        if decompose_steps is None:
            decompose_steps = defaults["decompose_steps"]
        if settings.get("diversity") and settings.get("diversity_steps") is None:
            settings["diversity_steps"] = max(steps, DIVERSITY_STEPS)
        return cls(model, preset, steps, decompose_steps, **{k: v for k, v in settings.items() if v is not None})

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Job":
        """The job a run folder's ``run.json`` ``config`` (:meth:`config`) records."""
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(fields - set(config) - set(LATER_SETTINGS))
        if missing:
            raise ValueError(f"the run record has no {', '.join(missing)}: it was written by another kv3d version")
        return cls(**{**LATER_SETTINGS, **{name: config[name] for name in fields if name in config}})

    def rectified(self, model, layer: str) -> bool:
        """Whether stage 1 maximises ``layer`` of ``model`` after a ReLU."""
        return self.rectify or (self.rectify_linear and layer in model.linear_layers)

    def stage1(self, model, layer: str) -> maximization.Config:
        """Stage 1's config for ``layer`` of ``model``: the preset with this job's steps, rectification
        and parameterization."""
        return maximization.preset(self.preset, steps=self.steps, rectify=self.rectified(model, layer),
                                   parameterization=self.parameterization)

    def diverse(self, model, layer: str) -> maximization.Config:
        """The diverse run's stage-1 config for ``layer`` of ``model``: stage 1's with :meth:`diverse_steps`."""
        return dataclasses.replace(self.stage1(model, layer), steps=self.diverse_steps())

    def stage2(self) -> decomposition.Config:
        """Stage 2's config: the reference's weights with this job's steps."""
        return decomposition.Config(steps=self.decompose_steps)

    def stage3(self, model, layer: str) -> refinement.Config | None:
        """Stage 3's config for ``layer`` of ``model``, or None when the job has no refinement."""
        if not self.refine_steps:
            return None
        return refinement.Config(motion=self.refine_motion, steps=self.refine_steps,
                                 preset=maximization.preset(self.preset, rectify=self.rectified(model, layer)),
                                 texture="maco" if self.parameterization == "maco" else "pixel")

    def video_shape(self, model) -> tuple[int, int, int]:
        """The ``(T, H, W)`` of the optimised videos: the preset's, else the model's input size."""
        return tuple(get_preset(self.preset).shape or model.input_shape)

    def record(self, model) -> KernelRecord:
        """What is stored and drawn for each kernel of this job on ``model``."""
        return KernelRecord(self.video_shape(model), self.refine_steps > 0, self.media,
                            attribution=self.parameterization == "maco", slowfast=self.slowfast > 0,
                            diversity=self.diversity)

    def config(self, model) -> dict:
        """What ``run.json`` records: every field (those of :data:`LATER_SETTINGS` only when used), the
        video shape and, for a model built with hyper-parameters, its config (``model_config``)."""
        fields = {name: value for name, value in dataclasses.asdict(self).items()
                  if name not in LATER_SETTINGS or value != LATER_SETTINGS[name]}
        config = {**fields, "video_shape": self.video_shape(model)}
        return {**config, "model_config": dict(model.config)} if model.config else config

    def describe(self, model, layer: str) -> str:
        """One line saying how ``layer``'s kernels were computed (a gallery page's subtitle)."""
        refined = f", {self.refine_steps} refinement steps ({self.refine_motion} motion)" if self.refine_steps else ""
        rectified = ", rectified" if self.rectified(model, layer) else ""
        rectified += f", {self.parameterization} parameterization" if self.parameterization != "pixel" else ""
        slowfast = f", slow/fast index at λ = {self.slowfast:g}" if self.slowfast else ""
        diverse = f", {self.diversity} diverse optima ({self.diverse_steps()} steps)" if self.diversity else ""
        return (f"{self.preset} preset{rectified}, {self.steps} stage-1 steps, {self.decompose_steps} "
                f"decomposition steps{refined}{slowfast}{diverse}, seed {self.seed}")

    def slowfast_steps(self) -> int:
        """Steps of the penalised stage 1 of the slow/fast index: stage 1's, or 0 without the index."""
        return self.steps if self.slowfast else 0

    def diverse_steps(self) -> int:
        """Steps of the diverse run: ``diversity_steps``, or stage 1's where that is 0; 0 without diverse optima."""
        return (self.diversity_steps or self.steps) if self.diversity else 0

    def diversity_cost(self) -> int:
        """What the diverse run costs, in stage-1 steps of one video: N optima of :meth:`diverse_steps` steps
        each (every step runs the model on all N); 0 without diverse optima."""
        return self.diversity * self.diverse_steps()

    def steps_per_kernel(self) -> int:
        """Optimisation steps every kernel goes through, all stages together, the diverse run's counted as
        one step per optimum per step (:meth:`diversity_cost`), what it costs."""
        return self.steps + self.decompose_steps + self.refine_steps + self.slowfast_steps() + self.diversity_cost()


def layers(model, names=None, every: bool = False) -> tuple[str, ...]:
    """The layers to visualise: ``names`` (checked), all of the model's if ``every``, else
    :data:`DEFAULT_LAYERS` for the default model; other models need them named."""
    if every:
        return tuple(model.layers)
    if names:
        return tuple(model.check_layer(layer) for layer in names)
    if model.name == DEFAULT_MODEL:
        return tuple(DEFAULT_LAYERS)
    raise ValueError(f"name the layers of {model.name} to visualise with --layer L (repeatable) or --layers all "
                     f"(the default job covers only {DEFAULT_MODEL}); valid layers are: {', '.join(model.layers)}")
