#!/usr/bin/env python
"""How much of a held-out subject can the mini world's teacher learn: K/V deltas or every UNet weight.

    .venv/bin/python scripts/probe_concept_capacity.py --concept crossed_ring --trains kv --lr 1e-3 --token-lr 1e-2
    .venv/bin/python scripts/probe_concept_capacity.py --concept crossed_ring --trains all --lr 3e-4 --token-lr 1e-3

A diagnostic for the quality benchmark (docs/quality.md), not a method: the teacher fits the
subject's five references with the plain masked denoising loss (batch 2, AdamW), training either
Custom Diffusion's cross-attention K/V deltas + the token row, or all UNet weights + the token row.
Then the teacher (25 DDIM steps, CFG 7.5) draws the training prompt and the subject's evaluation
prompts, and the shipped oracle scores both: high subject fidelity on the training prompt but not on
the evaluation prompts means the subject was memorized in its training context without carrying
over to new ones. Prints the loss every 50 steps and the scores; --grid saves the pictures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from echodistill.imaging import grid, save_png  # noqa: E402
from echodistill.miniworld import CONCEPTS, STUDENT_DIR, TEACHER_DIR, Oracle  # noqa: E402
from echodistill.miniworld.recipe import RESOLUTION, TOKEN  # noqa: E402
from echodistill.miniworld.scoring import UnitInputs  # noqa: E402
from echodistill.models.adapters import add_custom_diffusion  # noqa: E402
from echodistill.models.concept import add_concept_token, concept_parameters  # noqa: E402
from echodistill.models.diffusion import alphas_cumprod_for, encode_prompts, unet_call  # noqa: E402
from echodistill.models.pair import load_model_pair  # noqa: E402
from echodistill.models.schedule import add_noise, denoising_target  # noqa: E402
from echodistill.sampling.samplers import sample_teacher  # noqa: E402
from echodistill.training.data import ConceptDataset  # noqa: E402
from echodistill.training.losses import masked_denoising_loss  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default="crossed_ring", choices=sorted(CONCEPTS))
    parser.add_argument("--trains", choices=("kv", "all"), default="kv", help="K/V deltas or every UNet weight")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the UNet side")
    parser.add_argument("--token-lr", type=float, default=1e-2, help="learning rate of the token row")
    parser.add_argument("--augment", action="store_true", help="the trainer's shrink/zoom augmentation")
    parser.add_argument("--captions", action="store_true", help="grammar captions instead of the templates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", type=Path, help="save the training-prompt then evaluation-prompt pictures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    concept = CONCEPTS[args.concept]
    oracle = Oracle.load()
    pair = load_model_pair(TEACHER_DIR, STUDENT_DIR)
    unit = UnitInputs.build(concept, args.seed, 1, captions=args.captions)
    add_concept_token(pair.tokenizer, pair.text_encoder, TOKEN, concept.class_word)
    dataset = ConceptDataset(unit.images, token=TOKEN, class_word=concept.class_word, resolution=RESOLUTION,
                             latent_scale=pair.vae_downscale, augment=args.augment)
    unet = pair.teacher.unet
    if args.trains == "kv":
        unet_params = add_custom_diffusion(unet)
    else:
        unet_params = list(unet.parameters())
        unet.requires_grad_(True)
    optimizer = torch.optim.AdamW([{"params": unet_params, "lr": args.lr},
                                   {"params": concept_parameters(pair.text_encoder), "lr": args.token_lr}])
    abar = alphas_cumprod_for(pair.teacher.scheduler_config)  # (T,)
    data, noise_draws = torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(args.seed + 1)
    losses = []
    for step in range(1, args.steps + 1):
        batch = dataset.sample_batch(2, data)
        with torch.no_grad():
            latents = pair.vae.encode(batch.pixel_values).latent_dist.mean * pair.vae.config.scaling_factor
        cond = encode_prompts(pair.tokenizer, pair.text_encoder, batch.prompts)  # (2, 77, D)
        noise = torch.randn(latents.shape, generator=noise_draws)
        t = torch.randint(0, len(abar), (2,), generator=noise_draws)
        prediction = unet_call(unet, add_noise(latents, noise, t, abar), t, cond)
        target = denoising_target(latents, noise, t, abar, pair.teacher.prediction_type)
        loss = masked_denoising_loss(prediction, target, batch.mask).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0:
            print(f"step {step}: loss {sum(losses[-50:]) / 50:.4f}", flush=True)

    training_prompt = f"a photo of a {TOKEN} {concept.class_word}"
    if args.captions:
        training_prompt = unit.images[0].caption.replace("{}", f"{TOKEN} {concept.class_word}")
    texts = [training_prompt] * 8 + unit.texts
    with torch.no_grad():
        images = sample_teacher(pair, texts, seeds=list(range(len(texts))), width=RESOLUTION, height=RESOLUTION,
                                return_latents=False).images  # (8 + 12, 3, 64, 64)
    on_training = oracle.subject_fidelity(images[:8], unit.reference_pixels)
    on_evaluation = unit.score(oracle, images[8:])
    print(f"{args.concept}, trains {args.trains}, {args.steps} steps, lr {args.lr:g}, token lr {args.token_lr:g}: "
          f"subject fidelity on the training prompt {on_training:.3f}; on the evaluation prompts "
          f"{on_evaluation['subject_fidelity']:.3f} (prompt fidelity {on_evaluation['prompt_fidelity']:.3f})")
    if args.grid:
        save_png(grid(images, columns=10), args.grid, {})


if __name__ == "__main__":
    main()
