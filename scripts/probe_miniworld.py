#!/usr/bin/env python
"""Prompt fidelity of a mini-world teacher checkpoint while it trains (the teacher at 25 steps).

    .venv/bin/python scripts/probe_miniworld.py runs/miniworld/ckpt/teacher_running.pt --prompts 64

Writes the checkpoint as a temporary diffusers folder (the shipped VAE checkpoint from
runs/miniworld/ckpt/vae.pt), loads it with load_model_pair, samples through echodistill.sampling
and scores with the shipped oracle: the numbers the full run's eval stage would print for the teacher.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from echodistill.miniworld import architecture as arch  # noqa: E402
from echodistill.miniworld.evaluate import evaluation_captions, fidelity_summary, generate, image_grid  # noqa: E402
from echodistill.miniworld.oracle import Oracle  # noqa: E402
from echodistill.models.pair import load_model_pair  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="teacher_running.pt or teacher.pt")
    parser.add_argument("--vae", type=Path, default=REPO / "runs" / "miniworld" / "ckpt" / "vae.pt")
    parser.add_argument("--oracle", type=Path, default=arch.ORACLE_ROOT)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", type=Path, help="also save the first 32 pictures here (PNG)")
    parser.add_argument("--keep", type=Path, help="write the teacher/ and student/ folders here instead of a temporary "
                        "folder (the checkpoint stands in for both), for `echodistill bench world-probe --models`")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    vae_state = torch.load(args.vae, map_location="cpu", weights_only=True)
    unet, text_encoder, vae = arch.build_unet(), arch.build_text_encoder(), arch.build_vae()
    unet.load_state_dict(state["unet"])
    text_encoder.load_state_dict(state["text_encoder"])
    vae.load_state_dict(vae_state["state"])
    vae.register_to_config(scaling_factor=vae_state["scaling_factor"])
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        teacher = arch.write_model_folder(root / "teacher", "teacher", unet, text_encoder, vae)
        student = arch.write_model_folder(root / "student", "student", unet, text_encoder, vae)
        pair = load_model_pair(teacher, student)
        _, captions = evaluation_captions(args.prompts, args.seed)
        prompts = [caption.text for caption in captions]
        seeds = list(range(args.prompts))
        images = generate(pair, "teacher", prompts, seeds, steps=args.steps, guidance=args.guidance)
    if args.grid:
        Image.fromarray(image_grid(images[:32])).resize((8 * 64 * 2, 4 * 64 * 2), Image.NEAREST).save(args.grid)
        print("\n".join(f"{i:2d} {p}" for i, p in enumerate(prompts[:32])))
    summary = fidelity_summary(Oracle.load(args.oracle), images, captions)
    print(f"{args.checkpoint.name} step {state.get('step', 'final')}: teacher {args.steps} steps, "
          f"guidance {args.guidance}: {summary}")


if __name__ == "__main__":
    main()
