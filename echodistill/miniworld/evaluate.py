"""How well the shipped models follow the grammar, measured with the oracle through the real samplers.

    pair = load_model_pair(TEACHER_DIR, STUDENT_DIR)
    report = prompt_fidelity_report(pair, Oracle.load(), count=300, seed=0)

The teacher runs `sampling.sample_teacher` (DDIM, CFG) and the student `sampling.sample_student`
(one step at t = 999): the same calls a user's workflow makes, at 64×64.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..models.pair import ModelPair
from ..sampling.samplers import sample_student, sample_teacher
from .grammar import ATTRIBUTES, CONTEXT_ATTRIBUTES, Caption, Scene, describe, sample_scene
from .oracle import Oracle
from .render import RESOLUTION, render


def evaluation_captions(count: int, seed: int) -> tuple[list[Scene], list[Caption]]:
    """`count` random scenes, each described with every attribute stated."""
    rng = np.random.default_rng([seed, 7])
    scenes = [sample_scene(rng) for _ in range(count)]
    return scenes, [describe(scene) for scene in scenes]


def fidelity_summary(oracle: Oracle, images: torch.Tensor | np.ndarray, captions: list[Caption]) -> dict[str, float]:
    """Prompt fidelity, the same with the object's shape and colour counted too, and each attribute's accuracy.

    Prompt fidelity counts the context a prompt asks for (background colour and pattern, position,
    size): the attributes a personalized subject's prompts state too, so one number means the same
    for world prompts and concept prompts. `all_attributes` adds the grammar object's shape and colour.
    """
    stated = [caption.stated for caption in captions]
    context = [{k: v for k, v in s.items() if k in CONTEXT_ATTRIBUTES} for s in stated]
    summary = {"prompt_fidelity": float(oracle.prompt_fidelity(images, context).mean()),
               "all_attributes": float(oracle.prompt_fidelity(images, stated).mean())}
    read = oracle.read(images)
    for name in ATTRIBUTES:
        hits = [r[name] == s[name] for r, s in zip(read, stated) if name in s]
        summary[name] = float(np.mean(hits)) if hits else float("nan")
    return {k: round(v, 4) for k, v in summary.items()}


def generate(pair: ModelPair, role: str, prompts: list[str], seeds: list[int], *, steps: int, guidance: float,
             batch: int = 64) -> torch.Tensor:
    """(N, 3, 64, 64) images in [0, 1] from the teacher (DDIM) or the student (Euler trailing), in batches."""
    chunks = []
    for i in range(0, len(prompts), batch):
        kwargs = dict(seeds=seeds[i : i + batch], steps=steps, guidance=guidance, width=RESOLUTION,
                      height=RESOLUTION, return_latents=False)
        sampler = sample_teacher if role == "teacher" else sample_student
        chunks.append(sampler(pair, prompts[i : i + batch], **kwargs).images)
    return torch.cat(chunks)


def prompt_fidelity_report(
    pair: ModelPair,
    oracle: Oracle,
    count: int = 300,
    seed: int = 0,
    *,
    teacher_steps: int = 25,
    teacher_guidance: float = 7.5,
    student_steps: int = 1,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """Prompt fidelity of real renders (the oracle's ceiling), the teacher and the student."""
    scenes, captions = evaluation_captions(count, seed)
    prompts = [caption.text for caption in captions]
    seeds = list(range(seed * 100_000, seed * 100_000 + count))
    renders = np.stack([render(scene, np.random.default_rng([seed, 8, i])) for i, scene in enumerate(scenes)])
    images = {
        "renders": torch.from_numpy(renders).permute(0, 3, 1, 2).float() / 255.0,
        "teacher": generate(pair, "teacher", prompts, seeds, steps=teacher_steps, guidance=teacher_guidance),
        "student": generate(pair, "student", prompts, seeds, steps=student_steps, guidance=0.0),
    }
    report = {}
    for name, batch in images.items():
        report[name] = fidelity_summary(oracle, batch, captions)
        log(f"eval {name}: {report[name]}")
    return report, images


def image_grid(images: torch.Tensor, columns: int = 8) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> one uint8 (rows·H, columns·W, 3) picture."""
    count, _, height, width = images.shape
    rows = -(-count // columns)
    grid = torch.ones(3, rows * height, columns * width)
    for i in range(count):
        r, c = divmod(i, columns)
        grid[:, r * height : (r + 1) * height, c * width : (c + 1) * width] = images[i]
    return (grid.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()


def exact_evaluation_renders(concept, layout_seed: int) -> np.ndarray:
    """(12, 64, 64, 3) uint8: the concept's evaluation scenes drawn exactly (layouts from `layout_seed`), what a
    perfect personalized model would draw; the oracle's and the VAE's ceilings are scored on these."""
    from .concepts import evaluation_prompts

    rng = np.random.default_rng(layout_seed)
    return np.stack([render(prompt.scene, rng) for prompt in evaluation_prompts(concept)])


@torch.no_grad()
def vae_round_trip_fidelity(vae, oracle: Oracle, concept, layout_seed: int = 77) -> float:
    """The subject fidelity a perfect generator could reach through `vae` on `concept`: its evaluation
    scenes rendered exactly, encoded and decoded (posterior mean), scored against its references.

    A generator draws latents; its pictures are the VAE's decodings. Where the round trip already loses a
    subject's detail, no adapter can learn that subject, however good the UNet. Compare with the exact
    renders' own score (the oracle's ceiling, about 0.9: oracle_train.generalization_report).
    """
    from .concepts import reference_images

    exact = exact_evaluation_renders(concept, layout_seed)  # (12, 64, 64, 3)
    pixels = torch.from_numpy(exact).permute(0, 3, 1, 2).float() / 127.5 - 1  # (12, 3, 64, 64) in [-1, 1]
    pixels = pixels.to(vae.device, vae.dtype)
    decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample.float().clamp(-1, 1)
    return round(oracle.subject_fidelity((decoded + 1) / 2, reference_images(concept)), 4)


def vae_ceiling(vae, oracle: Oracle) -> dict[str, float]:
    """vae_round_trip_fidelity of each named concept (the layouts of generalization_report), and their mean."""
    from .concepts import CONCEPTS

    scores = {name: vae_round_trip_fidelity(vae, oracle, CONCEPTS[name], index + 77)
              for index, name in enumerate(sorted(CONCEPTS))}
    scores["mean"] = round(float(np.mean(list(scores.values()))), 4)
    return scores
