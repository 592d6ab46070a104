"""How a concept is trained on the mini world: the token, the config at the world's size, the rates, the data.

The demo trains with this recipe, and so does every EchoDistill row of `bench quality`, so the
demo's numbers and the benchmark's are comparable.
"""

from __future__ import annotations

import dataclasses

from PIL import Image

from ..errors import ConfigError
from ..training.config import TrainConfig, draft_configs, preset
from ..training.photos import ConceptImage, load_concept_images
from .concepts import REFERENCE_CAPTION_STATES, Concept, echo_prompts, reference_captions, reference_images
from .drawing import RESOLUTION

TOKEN = "<v*>"
TEACHER_STEPS, TEACHER_GUIDANCE = 25, 7.5  # how every score of the mini world draws with the teacher
NOISE_SEEDS_PER_UNIT = 100_000  # a concept x seed draws its i-th evaluation picture from noise seed·100,000 + i
MAX_UNIT_SEED = (2**63 - 1) // NOISE_SEEDS_PER_UNIT - 1  # the largest seed whose noise seeds fit torch's 64 bits
# Untrained reference rows: what a trained concept is measured against (miniworld.scoring scores them; kept here,
# free of torch, so that command-line help can name them at once).
PRIOR = "class_prior"  # the untrained student given the prompts without the token
TEACHER_PRIOR = "class_prior_teacher"  # what the teacher drew before training, the same way
START_PRIOR = "token_at_start"  # the untrained student with the token at its starting row: where training begins
IMAGE_PROMPT = "image_prompt"  # the untrained student with the image-prompt adapter: no training at all
DEMO_STEPS = 400  # the demo's training iterations (the quality benchmark's budget): about 3 min on 2 idle cores
DEMO_SEED = 0  # the demo's training and sampling seed
EVAL_IMAGES_PER_PROMPT = 4  # pictures per evaluation prompt (12 prompts a subject) of bench quality, lr-sweep, the
# demo and fleet metrics: at one, two scorings of the same trained concept differ by far more than the rows do (the
# demo's subject: 0.352 on 12 pictures, 0.420 on 48; docs/miniworld.md)
ECHO_SAMPLES = 8  # student images drawn per echo round at the mini world's size (the paper preset draws 16)
ECHO_PROMPTS = echo_prompts()  # the echo's new contexts: the world's own scenes, none of the evaluation's
# The augmentation's smallest rescale at 64 px: the whole picture, so no subject is ever shrunk (Custom
# Diffusion's zoomed-in crops and mirror images remain). Shrinking ruins a 64-px subject's detail, and its "a far
# away" / "very small" captions teach the token "draw it small": the world probe (teacher K/V + token, 400 steps,
# six subjects, docs/quality.md) on the second world's teacher at step 3,200 scored mean subject fidelity 0.203
# with the bound at half the picture, 0.360 at the whole picture, 0.370 with no rescale at all. (On the first
# world, the teacher fitted with all UNet weights: 0.57 without the augmentation, 0.19-0.22 with it.)
AUGMENT_MIN_SCALE = 1.0

# Factors of the published rates chosen for the mini world at 400 steps by `echodistill bench lr-sweep --concept
# procedural_3000002 --seed 100 --steps 400 --images-per-prompt 4` (docs/quality.md: a fresh subject no table row
# scores); the defaults of `bench quality` and the demo.
TUNED_LR_SCALES: dict[str, float] = {"echodistill": 10.0, "custom_diffusion": 1.0, "textual_inversion": 3.0,
                                     "dreambooth_lora": 1.0}
# The concept token row's own rate (TrainConfig.lr_token; 0: the rate of the adapters beside it) of the families that
# train a token row beside adapters, chosen by the same sweep's second stage (`--token-rates 3e-4 1e-3 3e-3 1e-2`)
# at the factors above. (Textual Inversion trains the row alone, at its factor's rate; DreamBooth-LoRA keeps its
# identifier frozen.)
TOKEN_LR_FAMILIES = ("echodistill", "custom_diffusion")
TUNED_TOKEN_LRS: dict[str, float] = {"echodistill": 1e-3, "custom_diffusion": 0.0}


def echodistill_config(class_word: str, steps: int, seed: int, **changes) -> TrainConfig:
    """The paper preset at the mini world's size, echo rounds scaled to the step budget (as the demo), the echo
    drawing scenes of the world's own grammar (concepts.echo_prompts)."""
    return preset("paper", steps=steps, resolution=RESOLUTION, token=TOKEN, class_word=class_word, seed=seed,
                  echo_samples=ECHO_SAMPLES, echo_prompts=ECHO_PROMPTS, sample_every=0, save_every=0,
                  augment_min_scale=AUGMENT_MIN_SCALE, **changes)  # preset() scales the echo rounds to `steps`


def scaled_rates(config: TrainConfig, lr_scale: float) -> TrainConfig:
    """`config` with the rates of what it personalizes (adapters, token rows) times `lr_scale`.

    The discriminator heads start from scratch at every size: their rate is not scaled.
    """
    return config.with_changes(lr_student=config.lr_student * lr_scale, lr_teacher=config.lr_teacher * lr_scale)


def tuned_config(class_word: str, steps: int, seed: int, **changes) -> TrainConfig:
    """EchoDistill at the mini world's tuned rates (TUNED_LR_SCALES, TUNED_TOKEN_LRS): what the demo trains."""
    with draft_configs():  # the rates change below: only the config returned warns
        config = echodistill_config(class_word, steps, seed, **changes)
    return scaled_rates(config, TUNED_LR_SCALES["echodistill"]).with_changes(lr_token=TUNED_TOKEN_LRS["echodistill"])


PRESET = "miniworld"  # the name `train --preset` and a fleet manifest's `preset =` give this recipe


def preset_config(changes: dict, default_steps: int = DEMO_STEPS) -> TrainConfig:
    """The "miniworld" preset: tuned_config for `changes["class_word"]`, at `changes`' steps and seed (defaults:
    `default_steps`, 0), with every other field of `changes` over it (each validated by TrainConfig).

    Raises ConfigError for a bad field (steps that are no whole number included)."""
    changes = dict(changes)
    steps, seed, class_word = changes.pop("steps", default_steps), changes.pop("seed", 0), changes.pop("class_word")
    try:
        with draft_configs():  # `changes` go over it: only the config returned warns (once)
            config = tuned_config(class_word, steps, seed)
    except ConfigError:  # list every problem at once: the recipe at its own values, then all the given ones
        with draft_configs():
            base = tuned_config("object", default_steps, 0).to_dict()
        return TrainConfig.from_dict({**base, "steps": steps, "seed": seed, "class_word": class_word, **changes})
    return TrainConfig.from_dict({**config.to_dict(), **changes})


def caption_states(captions: bool) -> list[str] | None:
    """What the references' training captions state, as benchmark reports record it (None: prompt templates)."""
    return sorted(REFERENCE_CAPTION_STATES) if captions else None


def training_references(concept: Concept, captions: bool = True, rendered=None) -> list[ConceptImage]:
    """A concept's references as training images, captioned in the world's grammar unless `captions` is False.

    The mini world's text encoder learned the grammar ("a large {} on a plain red background"); a template
    ("a photo of a {}") is a context it saw in only a fifth of its captions, and what a concept learns
    there carries over less to the grammar's evaluation prompts. `rendered`: the references already drawn.
    """
    rendered = reference_images(concept) if rendered is None else rendered  # (5, 64, 64, 3) uint8
    images = load_concept_images([Image.fromarray(a) for a in rendered], resolution=RESOLUTION)
    if not captions:
        return images
    return [dataclasses.replace(image, caption=caption)
            for image, caption in zip(images, reference_captions(concept), strict=True)]
