"""The training configuration: one typed, validated dataclass, with named presets.

Every field carries its help text; `TrainConfig.__post_init__` rejects out-of-range values
naming the field; `from_dict` rejects unknown keys. Variants are made with `with_changes`
(dataclasses.replace), never by mutating a config mid-run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, Literal, get_args, get_origin, get_type_hints

from ..errors import ConfigError, unknown_name, valid_names

AdapterKind = Literal["custom_diffusion", "lora"]
Precision = Literal["no", "bf16", "fp16"]
TrainingSchedule = Literal["joint", "sequential"]
DISCRIMINATOR_KINDS = ("teacher_features", "dino_vits16", "dinov2_vitl14", "clip_vit_h14")


class ConfigWarning(UserWarning):
    """A config that runs but does not do what its fields suggest (echo on, yet no echo round in the run)."""


def _check_type(name: str, value: Any, hint: Any, example: Any = None) -> None:
    """Raise ConfigError naming the field when `value` is not of the field's type (before any comparison);
    `example`: a good value the message shows (the field's default)."""
    origin = get_origin(hint)
    if origin is Literal:
        return  # checked against its choices
    if origin is tuple:
        item = (get_args(hint) or (str,))[0]
        if not isinstance(value, tuple) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{name}={value!r} must be a list of {item.__name__} values, e.g. "
                              f"{name}=[\"...\"]" if item is str else f"{name}={value!r} must be a list of numbers",
                              parameters=(name,))
        return
    expected = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(hint)
    if expected is None:
        return
    if not isinstance(value, expected) or (hint is not bool and isinstance(value, bool)):
        kind = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}[hint]
        if hint is int:  # nan, 1.5, "ten": say which whole numbers (a count of steps is at least 1), with an example
            kind += ", at least 1" if name in _POSITIVE else ", 0 or more" if name in _NON_NEGATIVE else ""
            kind += f", e.g. {name}={example!r}" if isinstance(example, int) else ""
        raise ConfigError(f"{name}={value!r} must be {kind}", parameters=(name,))


@contextlib.contextmanager
def draft_configs() -> Iterator[None]:
    """Build configs that are changed again before use (a recipe's base, then the caller's changes): their
    caveats (ConfigWarning) are not shown; the config finally used warns its own, once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        yield


def raise_together(problems: list[ConfigError]) -> None:
    """Raise the one problem, or one ConfigError listing them all (its `parameters` those of every problem,
    its `problems` the single ones: a list given here is flattened, never nested)."""
    problems = [single for problem in problems for single in getattr(problem, "problems", (problem,))]
    if len(problems) == 1:
        raise problems[0]
    if problems:
        error = ConfigError(f"{len(problems)} config problems:\n" + "\n".join(f"  - {p}" for p in problems),
                            parameters=tuple(dict.fromkeys(name for p in problems for name in p.parameters)))
        error.problems = tuple(problems)
        raise error


# The whole-number fields that count something (at least 1), and the numbers that may be 0 but not negative.
_POSITIVE = ("steps", "batch_size", "resolution", "lora_rank", "target_steps", "echo_every", "echo_samples",
             "echo_per_step", "echo_buffer_size", "ms_swd_projections", "ms_swd_scales", "log_every")
_NON_NEGATIVE = ("weight_decay", "grad_clip", "weight_adversarial", "weight_latent_mse", "weight_semantic",
                 "weight_ms_swd", "teacher_cfg", "echo_weight", "echo_start", "sample_every", "save_every", "seed",
                 "lr_token")


# The echo's new contexts for SD-sized models (TrainConfig.echo_prompts): scenes SD knows, none like the references'.
ECHO_PROMPTS = tuple(f"a photo of a {{}} {context}" for context in (
    "on a sandy beach", "in the snow", "on a wooden table", "in a city street", "in a green forest",
    "on a kitchen counter", "in front of a brick wall", "on a sofa", "at night under street lights",
    "in a field of flowers", "on top of a mountain", "in a swimming pool",
))
# Fields added after runs, checkpoints and bundles were first written, each with the value that computes what
# runs did before it existed: a run key leaves them out at that value, and a record without them reads it.
FIELDS_ADDED_LATER = {"lr_token": 0.0, "echo_prompts": list(ECHO_PROMPTS)}


def _f(default, help: str):
    """A field with its help text (defaults are immutable: tuples, not lists)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    # --- schedule -------------------------------------------------------------------------
    steps: int = _f(1000, "training iterations")
    batch_size: int = _f(2, "real concept images per iteration")
    resolution: int = _f(512, "training resolution in pixels (square)")
    seed: int = _f(42, "seed of every random draw (data, noise, timesteps)")
    schedule: TrainingSchedule = _f(
        "joint",
        "joint: teacher and student train together every iteration; sequential (the 'teacher first, then distill' "
        "baseline): the teacher alone for the first half of the steps, then the student against the frozen teacher",
    )
    # --- concept --------------------------------------------------------------------------
    token: str = _f("<v*>", "the new concept word added to the shared tokenizer")
    class_word: str = _f("object", "the subject's class word, e.g. 'dog'; also the token's initializer")
    initializer: str = _f("", "word(s) the token's embedding starts from (empty: the class word)")
    shared_text_encoder: bool = _f(
        True,
        "one text encoder for both UNets, its token row trained by the teacher's loss alone; False (ablation): "
        "the student reads the prompts through its own copy, its own token row trained by the student's losses",
    )
    # --- optimisation (paper: AdamW, constant LRs) ------------------------------------------
    lr_student: float = _f(2e-5, "learning rate of the student's adapters (and own token row, if not shared, unless "
                                 "lr_token)")
    lr_teacher: float = _f(1e-5, "learning rate of the teacher's adapters and the concept token row (unless lr_token)")
    lr_token: float = _f(
        0.0,
        "learning rate of the concept token row(s) alone; 0: the rate of the adapters trained beside them (lr_teacher "
        "for the shared encoder's row, lr_student for the student's own), as the paper and Custom Diffusion train them",
    )
    lr_heads: float = _f(1e-4, "learning rate of the discriminator heads")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    weight_decay: float = _f(1e-2, "AdamW weight decay (adapter deltas decay toward the base weights)")
    grad_clip: float = _f(1.0, "max gradient norm per optimizer (0 disables clipping)")
    # --- adapters ---------------------------------------------------------------------------
    adapter: AdapterKind = _f("custom_diffusion", "custom_diffusion: train cross-attention K/V; lora: peft LoRA")
    lora_rank: int = _f(4, "LoRA rank (adapter='lora')")
    lora_alpha: float = _f(4.0, "LoRA alpha (adapter='lora')")
    lora_targets: tuple[str, ...] = _f(("attn2.to_k", "attn2.to_v"), "module name suffixes LoRA wraps")
    # --- losses (weights; alignment terms are multiplied per sample by alpha_bar_t) -------------
    weight_adversarial: float = _f(1.0, "weight of each discriminator's generator loss")
    weight_latent_mse: float = _f(1.0, "weight of 0.5*||z_s - z_target||^2")
    weight_semantic: float = _f(1.0, "weight of the CLIP-space cosine distance (needs a clip_vit_h14 backbone)")
    weight_ms_swd: float = _f(0.1, "weight of the multi-scale sliced Wasserstein colour loss")
    alpha_bar_weighting: bool = _f(True, "multiply alignment terms by alpha_bar of the target's timestep")
    # --- teacher target ---------------------------------------------------------------------
    teacher_cfg: float = _f(7.5, "classifier-free guidance of the teacher's target")
    target_steps: int = _f(1, "teacher evaluations for the target: 1 = one x0 prediction, k > 1 = k DDIM steps")
    target_timestep_min: int = _f(20, "smallest timestep the student's output is re-noised to")
    target_timestep_max: int = _f(980, "largest timestep the student's output is re-noised to")
    student_timestep: int = _f(999, "the student's one-step timestep (Euler trailing: 999)")
    # --- discriminators ---------------------------------------------------------------------
    discriminators: tuple[str, ...] = _f(("teacher_features",), f"ensemble members, any of {DISCRIMINATOR_KINDS}")
    discriminator_timestep_max: int = _f(500, "teacher-feature discriminator: latents are noised to t in [0, this]")
    ms_swd_projections: int = _f(64, "random projections per MS-SWD scale")
    ms_swd_scales: int = _f(4, "Gaussian pyramid levels of MS-SWD")
    # --- echo (student -> teacher) ------------------------------------------------------------
    echo: bool = _f(True, "feed the student's best generations back to the teacher")
    echo_start: int = _f(500, "first iteration at which echo samples are drawn")
    echo_every: int = _f(250, "iterations between echo rounds")
    echo_samples: int = _f(16, "student images drawn per echo round")
    echo_keep_ratio: float = _f(
        0.25, "fraction of each round kept (best by discriminator realness + reference similarity)"
    )
    echo_weight: float = _f(0.5, "weight of an echoed sample in the teacher's loss (a real image weighs 1)")
    echo_per_step: int = _f(1, "echoed samples added to each teacher batch once echo has started")
    echo_buffer_size: int = _f(32, "most recent echoed samples kept")
    echo_prompts: tuple[str, ...] = _f(
        ECHO_PROMPTS,
        "the new contexts the student draws the concept in for the echo, each with one {} for '<token> <class "
        "word>'; contexts the base models know (the mini world's recipe: its own grammar)",
    )
    # --- precision / memory -----------------------------------------------------------------
    mixed_precision: Precision = _f("no", "autocast dtype for forwards: no, bf16 or fp16")
    gradient_checkpointing: bool = _f(
        False, "recompute UNet and VAE-decoder activations in backward (less memory, ~30% slower)"
    )
    cache_latents: bool = _f(
        False,
        "encode each reference photo and its mirror image with the VAE once, not every iteration; drops the "
        "rescale augmentation (far away / zoomed in), since a rescaled photo's latent cannot be cached",
    )
    augment_min_scale: float = _f(
        1 / 3,
        "smallest rescale of the augmentation, as a fraction of the resolution (Custom Diffusion's 1/3); a low "
        "resolution needs a larger bound, or a shrunk subject spans too few latent cells to keep its detail",
    )
    offload: bool = _f(
        False, "CUDA: keep the text encoder, VAE and image backbones on the CPU while a stage does not use them"
    )
    # --- observation --------------------------------------------------------------------------
    sample_every: int = _f(100, "one-step preview images every N iterations (0: never)")
    save_every: int = _f(250, "resumable checkpoint every N iterations; one is always written at the end and "
                                  "on cancel (0: only then)")
    log_every: int = _f(1, "progress callback every N iterations")

    def __post_init__(self):
        # Every problem is reported at once (a manifest or a --set line may hold several): the range checks
        # compare numbers, so they skip only the fields of the wrong type, which are reported as such.
        types = list(self._type_problems())
        raise_together([*types, *self._value_problems(skip={name for p in types for name in p.parameters})])
        for caveat in self.caveats():
            warnings.warn(caveat, ConfigWarning, stacklevel=3)

    def caveats(self) -> list[str]:
        """What this (valid) config does that its fields do not suggest, one sentence each; __post_init__
        warns each as a ConfigWarning. Today: echo on, yet no echo round within the run."""
        if self.echo and self.echo_start >= self.steps:
            # echo starts after step echo_start, so a run of one step can never echo, whatever echo_start is
            fix = (f"use echo_start={self.steps // 2} (preset() scales it to steps) or echo=false" if self.steps > 1
                   else "train 2 or more steps, or pass echo=false")
            return [f"echo=true but echo_start={self.echo_start} >= steps={self.steps}: this run never echoes; {fix}"]
        return []

    def _type_problems(self) -> Iterator[ConfigError]:
        """Each field of the wrong type, not finite, or not one of its choices (a ConfigError naming it)."""
        hints = get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            try:
                _check_type(f.name, value, hints[f.name], f.default)
            except ConfigError as problem:
                yield problem
                continue
            if isinstance(value, float) and not math.isfinite(value):  # inf / nan would train to NaN or never stop
                yield ConfigError(f"{f.name}={value!r} must be a finite number", parameters=(f.name,))
            choices = get_args(hints[f.name]) if get_origin(hints[f.name]) is Literal else ()
            if choices and value not in choices:
                yield ConfigError(f"{f.name}={value!r} is not one of {', '.join(map(repr, choices))}",
                                  parameters=(f.name,))

    def _value_problems(self, skip: set[str] = frozenset()) -> Iterator[ConfigError]:
        """Each value out of its range (a ConfigError naming it). The fields in `skip` (of the wrong type, not
        finite: _type_problems names them) are compared with nothing."""

        def checked(*names: str) -> bool:
            return not skip.intersection(names)

        for name in _POSITIVE:
            if checked(name) and getattr(self, name) < 1:
                yield ConfigError(f"{name}={getattr(self, name)!r} must be at least 1", parameters=(name,))
        for name in ("lr_student", "lr_teacher", "lr_heads", "adam_epsilon", "lora_alpha"):
            if checked(name) and not getattr(self, name) > 0:
                yield ConfigError(f"{name}={getattr(self, name)!r} must be positive", parameters=(name,))
        for name in ("lr_student", "lr_teacher", "lr_heads", "lr_token"):  # AdamW steps of size ~lr: above 1 is a typo
            if checked(name) and getattr(self, name) > 1:
                yield ConfigError(f"{name}={getattr(self, name)!r} must be at most 1 (AdamW moves each weight by "
                                  "about the rate per step)", parameters=(name,))
        if checked("steps") and self.steps > MAX_STEPS:
            yield ConfigError(f"steps={self.steps!r} must be at most {MAX_STEPS:,} (a personalization trains for "
                              "hundreds to a few thousand steps; more is a typo)", parameters=("steps",))
        if checked("resolution") and self.resolution > MAX_RESOLUTION:
            yield ConfigError(f"resolution={self.resolution!r} must be at most {MAX_RESOLUTION} pixels (SD 2.1 "
                              "trains at 512, SDXL at 1024)", parameters=("resolution",))
        if checked("batch_size") and self.batch_size > MAX_BATCH_SIZE:
            yield ConfigError(f"batch_size={self.batch_size!r} must be at most {MAX_BATCH_SIZE} (images per "
                              "iteration: the presets take 1 or 2)", parameters=("batch_size",))
        if checked("seed") and self.seed > MAX_SEED:
            yield ConfigError(f"seed={self.seed!r} must be at most {MAX_SEED} (torch.Generator's seeds are 64-bit)",
                              parameters=("seed",))
        for name in _NON_NEGATIVE:
            if checked(name) and getattr(self, name) < 0:
                yield ConfigError(f"{name}={getattr(self, name)!r} must not be negative", parameters=(name,))
        for name in ("adam_beta1", "adam_beta2"):
            if checked(name) and not 0 <= getattr(self, name) < 1:
                yield ConfigError(f"{name}={getattr(self, name)!r} must be in [0, 1)", parameters=(name,))
        if checked("augment_min_scale") and not 0 < self.augment_min_scale <= 1:
            yield ConfigError(f"augment_min_scale={self.augment_min_scale!r} must be in (0, 1]",
                              parameters=("augment_min_scale",))
        if checked("echo_prompts"):
            if not self.echo_prompts:
                yield ConfigError("echo_prompts=[] must list at least one prompt, e.g. [\"a photo of a {} in the "
                                  "snow\"]", parameters=("echo_prompts",))
            for prompt in self.echo_prompts:
                if prompt.count("{}") != 1:
                    yield ConfigError(f"echo_prompts=[..., {prompt!r}, ...]: that prompt has {prompt.count('{}')} "
                                      "'{}' placeholders; each needs exactly one, where '<token> <class word>' goes "
                                      "(e.g. 'a photo of a {} in the snow')", parameters=("echo_prompts",))
        if checked("echo_keep_ratio") and not 0 < self.echo_keep_ratio <= 1:
            yield ConfigError(f"echo_keep_ratio={self.echo_keep_ratio!r} must be in (0, 1]",
                              parameters=("echo_keep_ratio",))
        if checked("resolution") and self.resolution % 64:
            yield ConfigError(f"resolution={self.resolution!r} must be a multiple of 64", parameters=("resolution",))
        timesteps = ("target_timestep_min", "target_timestep_max", "student_timestep", "discriminator_timestep_max")
        for name in timesteps:
            if checked(name) and not 0 <= getattr(self, name) <= 999:
                yield ConfigError(f"{name}={getattr(self, name)!r} must be in [0, 999]", parameters=(name,))
        if checked(*timesteps[:2]) and self.target_timestep_min > self.target_timestep_max:
            yield ConfigError(
                f"target_timestep_min={self.target_timestep_min} exceeds target_timestep_max={self.target_timestep_max}"
            )
        if checked("discriminators"):
            if not self.discriminators:
                yield ConfigError(f"discriminators is empty: list at least one of {', '.join(DISCRIMINATOR_KINDS)}")
            unknown = [d for d in self.discriminators if d not in DISCRIMINATOR_KINDS]
            if unknown:
                yield ConfigError(f"discriminators={unknown!r}: valid names are {', '.join(DISCRIMINATOR_KINDS)}",
                                  parameters=("discriminators",))
        if checked("token") and (not self.token or any(ch.isspace() for ch in self.token)):
            yield ConfigError(f"token={self.token!r} must be one word without whitespace, e.g. '<v*>'",
                              parameters=("token",))
        if checked("class_word") and not self.class_word.strip():
            yield ConfigError(f"class_word={self.class_word!r} is empty: give the subject's class, e.g. 'dog'",
                              parameters=("class_word",))
        if checked("schedule", "echo", "steps") and self.schedule == "sequential":
            if self.echo:
                yield ConfigError(
                    "schedule='sequential' with echo=True: the teacher is frozen once the student trains, so "
                    "nothing could be echoed back to it; set echo=False"
                )
            if self.steps == 1:  # 0 is reported above
                yield ConfigError(f"schedule='sequential' needs steps >= 2 (one per phase), got steps={self.steps}")
        # custom_diffusion always adapts every attn2.to_k / to_v: targets given for it would be dropped silently.
        default_targets = next(f.default for f in fields(self) if f.name == "lora_targets")
        if (checked("adapter", "lora_targets") and self.adapter == "custom_diffusion"
                and set(self.lora_targets) != set(default_targets)):  # the same targets in another order: harmless
            yield ConfigError(
                f"lora_targets={list(self.lora_targets)!r} is read by the LoRA adapter only: custom_diffusion always "
                "trains every cross-attention K/V (attn2.to_k, attn2.to_v); use adapter='lora' with it, or leave "
                "lora_targets out", parameters=("lora_targets", "adapter"))

    # --- derived ------------------------------------------------------------------------------
    @property
    def initializer_word(self) -> str:
        return self.initializer or self.class_word

    @property
    def teacher_phase_steps(self) -> int:
        """Iterations in which the teacher trains: all of them (joint), or the first half (sequential)."""
        return self.steps if self.schedule == "joint" else self.steps // 2

    # --- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """The config `data` gives (lists become tuples). Raises ConfigError listing every problem at once:
        unknown keys (each with the field it may mean) and the known fields' problems."""
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return _built_with_unknown_keys(values, lambda known: cls(**known))

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        return cls.from_dict(cls.json_fields(text))

    @staticmethod
    def json_fields(text: str) -> dict[str, Any]:
        """The fields a JSON config (as to_json writes it) gives, unchecked: what from_json builds from.
        Raises ConfigError for text that is not a JSON object, or that gives a field twice."""
        twice: list[str] = []

        def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            seen = dict(pairs)
            twice.extend(k for k in seen if [key for key, _ in pairs].count(k) > 1)
            return seen

        try:
            data = json.loads(text, object_pairs_hook=unique_keys)
        except json.JSONDecodeError as error:
            raise ConfigError(f"the config is not JSON ({error}); write it as TrainConfig.to_json does") from None
        if twice:  # json keeps the last silently: which one the writer meant is unknown
            raise ConfigError(f"the config gives {', '.join(dict.fromkeys(twice))} twice; give each field once")
        if not isinstance(data, dict):
            raise ConfigError(f"the config must be a JSON object of fields, not {type(data).__name__}")
        return data

    def parameter_groups(self, adapters: list, token_rows: list, adapter_lr: float) -> list[dict]:
        """AdamW parameter groups: `adapters` at `adapter_lr`, `token_rows` at lr_token (one group with the
        adapters when lr_token is 0, so that the optimizer's state keeps the layout of runs before the field)."""
        if not self.lr_token or not token_rows:
            return [{"params": [*adapters, *token_rows], "lr": adapter_lr}]
        return [{"params": list(adapters), "lr": adapter_lr}, {"params": list(token_rows), "lr": self.lr_token}]

    def with_changes(self, **changes) -> "TrainConfig":
        """This config with `changes`; ConfigError lists every problem at once, as from_dict."""
        return _built_with_unknown_keys(changes, lambda known: dataclasses.replace(self, **known))

    @staticmethod
    def help() -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(TrainConfig)}


# Where every config field is listed, for a message whose unknown names each come with their likely fix.
FIELDS_LISTED_IN = "the options table in README.md (\"Training a concept\")"


def _built_with_unknown_keys(values: dict[str, Any], build) -> "TrainConfig":
    """build(the known fields of `values`), or ConfigError listing the unknown keys (each with the field it may
    mean) together with the problems of the known ones."""
    names = [f.name for f in fields(TrainConfig)]
    unknown = sorted(set(values) - set(names))
    if not unknown:
        return build(values)
    told = ", ".join(unknown_name(key, names) for key in unknown)
    listed = valid_names(unknown, names, label="valid keys", listed_in=FIELDS_LISTED_IN)
    problems = [ConfigError(f"unknown config key(s) {told}; {listed}", parameters=tuple(unknown))]
    try:
        with draft_configs():  # refused anyway: no caveat about it
            build({k: v for k, v in values.items() if k in names})
    except ConfigError as problem:
        problems.append(problem)
    raise_together(problems)


# Presets: the paper's defaults, and leaner variants for consumer GPUs.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "balanced": {"mixed_precision": "bf16", "gradient_checkpointing": True},
    "lite": {"mixed_precision": "bf16", "gradient_checkpointing": True, "batch_size": 1, "echo_samples": 8,
             "cache_latents": True, "offload": True},
}


# What a preset changes on top for one model line, where that line's size calls for it (estimates: `echodistill
# bench memory`, docs/memory.md). SDXL: the paper's full cross-attention K/V deltas are 683 M parameters in its two
# UNets, 10.9 GB in fp32 with their gradients and AdamW moments, so `lite` (at most 24 GB) trains LoRA on the same
# K/V projections instead (the config's LoRA defaults).
LINE_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "sd": {},
    "sdxl": {"lite": {"adapter": "lora"}},
}


MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes
MAX_STEPS = 1_000_000  # a guard against typos: the paper preset trains 1,000 steps
MAX_RESOLUTION = 4096  # pixels per side: 8x SD 2.1's 512, 4x SDXL's 1024 (more is a typo, or out of memory)
MAX_BATCH_SIZE = 256  # images per iteration: the presets take 1 or 2


def echo_schedule(steps: int) -> dict[str, int]:
    """The echo schedule scaled to a run of `steps`: the paper's 500 and 250 of 1000 iterations
    (first echo half-way, then every quarter), so a short run echoes too."""
    return {"echo_start": max(1, steps // 2), "echo_every": max(1, steps // 4)}


def preset(name: str, *, line: str = "sd", **overrides) -> TrainConfig:
    """A named preset for a model line ("sd": SD 1.x / 2.x, "sdxl"), with field overrides (each validated).

    `LINE_PRESETS` says what a line changes (SDXL's `lite` trains LoRA K/V); overrides win over both.
    Given `steps` without `echo_start` / `echo_every`, the echo schedule follows the run's length
    (`echo_schedule`): the paper's 500 / 250 would never echo in a 200-step run.
    Raises ConfigError for an unknown preset, line or field.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    if line not in LINE_PRESETS:
        raise ConfigError(f"unknown model line {line!r}; valid lines: {', '.join(LINE_PRESETS)}")
    values = {**PRESETS[name], **LINE_PRESETS[line].get(name, {}), **overrides}
    steps = overrides.get("steps")
    if isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1:  # else TrainConfig names the fault
        values = {**echo_schedule(steps), **values}
    return TrainConfig().with_changes(**values)
