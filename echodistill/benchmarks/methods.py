"""The rows of `bench quality` and how each trains: EchoDistill, its ablations, the baselines, the teacher,
and the zero-training image prompt (which trains nothing: it reads the references at sampling time).

Learning rates are tuned per family (LR_FAMILIES): the ablations and the teacher row keep the full
method's rates (an ablation removes a part, not a setting), each baseline has its own. The mini
world's recipe (echodistill.miniworld.recipe) gives the full method's config and the tuned factors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from ..miniworld.recipe import (
    AUGMENT_MIN_SCALE,
    IMAGE_PROMPT,
    PRIOR,
    RESOLUTION,
    START_PRIOR,
    TEACHER_PRIOR,
    TEACHER_STEPS,
    TOKEN,
    TOKEN_LR_FAMILIES,
    TUNED_LR_SCALES,
    TUNED_TOKEN_LRS,
    echodistill_config,
    scaled_rates,
)
from ..training.config import TrainConfig
from .baseline_settings import baseline_config
from .names import BenchError


@dataclass(frozen=True)
class Method:
    label: str
    changes: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides of the full method
    baseline: str | None = None  # a baselines.BASELINES name: student-only training
    part: str = "student"  # which side of the trained concept is sampled
    trained: bool = True  # False: no training run; the row samples the untrained pair with an adapter file
    run: str | None = None  # the training run whose concept the row samples (None: its own)
    paired_with: str | None = None  # the row it is paired against (None: REFERENCE_METHOD)

    def run_of(self, name: str) -> str:
        return self.run or name


METHODS: dict[str, Method] = {
    "echodistill": Method("EchoDistill (full), student 1 step"),
    "no_echo": Method("w/o echo", {"echo": False}),
    "no_adversarial": Method("w/o adversarial", {"weight_adversarial": 0.0}),
    "no_shared_encoder": Method("w/o shared text encoder", {"shared_text_encoder": False}),
    "sequential": Method("sequential: teacher, then distill", {"schedule": "sequential", "echo": False}),
    "custom_diffusion": Method("Custom Diffusion K/V on the student", baseline="custom_diffusion"),
    "textual_inversion": Method("Textual Inversion on the student", baseline="textual_inversion"),
    "dreambooth_lora": Method("DreamBooth-LoRA on the student", baseline="dreambooth_lora"),
    "teacher": Method(f"EchoDistill teacher, {TEACHER_STEPS} DDIM steps", part="teacher", run="echodistill"),
    # the echo's effect on the teacher it feeds back into (the paper's claim is about both sides)
    "teacher_no_echo": Method(f"w/o echo: teacher, {TEACHER_STEPS} DDIM steps", part="teacher", run="no_echo",
                              paired_with="teacher"),
    IMAGE_PROMPT: Method("zero-training image prompt (IP-Adapter style), student 1 step", trained=False),
}
# What `bench quality` runs when --methods is not given: every row that needs no file beyond the models and the
# oracle (the image_prompt row also reads an adapter file: shipped beside the mini world's oracle, trained per world).
DEFAULT_METHODS = tuple(name for name in METHODS if name != IMAGE_PROMPT)
PRIOR_LABEL = "class-word prior (untrained student, token removed)"
PRIOR_LABELS = {PRIOR: PRIOR_LABEL,
                START_PRIOR: "untrained student, token at its starting row (the class word's)",
                TEACHER_PRIOR: f"class-word prior of the teacher ({TEACHER_STEPS} steps, untrained, token removed)"}

REFERENCE_METHOD = "echodistill"  # the row every other row is paired against


def prior_rows(methods: Sequence[str]) -> list[str]:
    """The untrained reference rows a table of `methods` shows."""
    teacher_rows = any(METHODS[m].part == "teacher" for m in methods)
    return [PRIOR, START_PRIOR, *([TEACHER_PRIOR] if teacher_rows else [])]


LR_FAMILIES = ("echodistill", "custom_diffusion", "textual_inversion", "dreambooth_lora")


def lr_family(name: str) -> str:
    return METHODS[name].baseline or "echodistill"


def parse_lr_scales(specs: Sequence[str]) -> dict[str, float]:
    """`FAMILY=FACTOR` strings -> {family: factor} for every family (TUNED_LR_SCALES where not given)."""
    return _family_values("--lr-scale", "FACTOR", specs, TUNED_LR_SCALES, LR_FAMILIES, positive=True)


def parse_token_lrs(specs: Sequence[str]) -> dict[str, float]:
    """`FAMILY=RATE` strings -> {family: the token row's rate} for every family of TOKEN_LR_FAMILIES
    (TUNED_TOKEN_LRS where not given; 0: the rate of the adapters beside the row). Raises BenchError."""
    return _family_values("--token-lr", "RATE", specs, TUNED_TOKEN_LRS, TOKEN_LR_FAMILIES, positive=False)


def _family_values(flag: str, value_name: str, specs: Sequence[str], defaults: dict[str, float],
                   families: Sequence[str], *, positive: bool) -> dict[str, float]:
    values, given = dict(defaults), set()
    for spec in specs:
        family, _, text = spec.partition("=")
        try:
            value = float(text) if "_" not in text else float("nan")  # float() reads "0_001" as 1
        except ValueError:
            value = float("nan")
        if family in given:
            raise BenchError(f"{flag}: two values for {family}; give each family once")
        given.add(family)
        in_range = 0 < value <= 1000 if positive else 0 <= value <= 1
        if family not in families or not in_range:
            bound = "a factor > 0 (at most 1000)" if positive else "a rate from 0 (the adapters' rate) to 1"
            raise BenchError(f"{flag} {spec!r}: write FAMILY={value_name} with {bound} and FAMILY one of "
                             f"{', '.join(families)}")
        values[family] = value
    return values


def method_config(name: str, class_word: str, steps: int, seed: int, lr_scale: float = 1.0,
                  token_lr: float = 0.0) -> TrainConfig:
    """A method's config; `lr_scale` multiplies the rates of what it personalizes (adapters, token rows);
    `token_lr` > 0 trains the token row at that rate instead (TrainConfig.lr_token)."""
    method = METHODS[name]
    if method.baseline:
        config = baseline_config(method.baseline, steps=steps, resolution=RESOLUTION, token=TOKEN,
                                 class_word=class_word, seed=seed, augment_min_scale=AUGMENT_MIN_SCALE)
        return config.with_changes(lr_student=config.lr_student * lr_scale, lr_token=token_lr)
    return scaled_rates(echodistill_config(class_word, steps, seed, **method.changes), lr_scale).with_changes(
        lr_token=token_lr)


def training_runs(methods: Sequence[str]) -> list[str]:
    """The trainings the rows need, each once, in the rows' order: a teacher row is the teacher side of the run it
    names (the full run, or w/o echo); untrained rows need none."""
    return list(dict.fromkeys(METHODS[m].run_of(m) for m in methods if METHODS[m].trained))


def rows_served(run: str, methods: Sequence[str]) -> list[str]:
    """The rows of `methods` that sample the concept training `run` makes (itself and/or a teacher row)."""
    return [m for m in methods if METHODS[m].trained and METHODS[m].run_of(m) == run]
