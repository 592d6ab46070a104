"""Sampler nodes: the one-step student and the multi-step teacher, with an optional concept."""

from __future__ import annotations

from comfy_api.latest import io

from echodistill.jobs.runs import sample
from echodistill.sampling.samplers import native_resolution

from .convert import to_comfy_images
from .types import Concept, Models

CATEGORY = "EchoDistill"


def _common_inputs(steps_default: int, steps_max: int, guidance_default: float) -> list:
    return [
        Models.Input("models", tooltip="From Load EchoDistill Models."),
        io.String.Input("prompt", multiline=True, default="a photo of a <v*> dog on the beach",
                        tooltip="Use the concept's token (e.g. <v*>) to draw your subject."),
        io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                     tooltip="Seed of the first image; image i uses seed + i."),
        io.Int.Input("steps", default=steps_default, min=1, max=steps_max, tooltip="Sampling steps."),
        io.Float.Input("guidance", default=guidance_default, min=0.0, max=20.0, step=0.1,
                       tooltip="Classifier-free guidance (values <= 1 switch it off)."),
        io.Int.Input("width", default=0, min=0, max=2048, step=64,
                     tooltip="Image width in pixels, a multiple of 64; 0 = the models' native size (512 for SD 2.1 "
                             "base, SD-Turbo and SDXL-Turbo, 768 for SD 2.1 768-v, 1024 for SDXL base, 64 for the "
                             "mini world). Far from it the "
                             "models draw noise (a warning in the console)."),
        io.Int.Input("height", default=0, min=0, max=2048, step=64,
                     tooltip="Image height in pixels, a multiple of 64; 0 = the models' native size."),
        io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images to draw."),
        Concept.Input("concept", optional=True, tooltip="A trained concept; leave empty for the base model."),
    ]


def _outputs(who: str) -> list:
    return [io.Image.Output(display_name="images", tooltip=f"The {who}'s images."),
            io.Latent.Output(display_name="latent", tooltip="The same images as latents, for core VAE Decode / upscalers.")]


def _run(part: str, models, prompt, seed, steps, guidance, width, height, batch_size, concept, **extra):
    native = native_resolution(models, part)
    width, height = width or native, height or native
    result = sample(models, [prompt] * batch_size, concept=concept, part=part, seeds=list(range(seed, seed + batch_size)),
                    steps=steps, guidance=guidance, width=width, height=height, **extra)
    # ComfyUI's LATENT holds raw VAE latents; its SD model formats apply the scaling factor themselves.
    latent = {"samples": result.latents / models.vae.config.scaling_factor}
    return io.NodeOutput(to_comfy_images(result.images), latent)


class OneStepSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EchoDistillOneStepSampler",
            display_name="One-Step Sampler (EchoDistill student)",
            category=CATEGORY,
            description="Draws with the one-step student (t = 999, guidance 0), with or without a trained concept. "
                        "At 1 step it is what an exported concept gives in core nodes with SDTurboScheduler; at 2-4 "
                        "steps pick schedule 'comfyui_turbo' to match SDTurboScheduler + the euler sampler.",
            inputs=_common_inputs(1, 4, 0.0) + [
                io.Combo.Input("schedule", options=["trailing", "comfyui_turbo"], default="trailing", optional=True,
                               tooltip="Timesteps at 2-4 steps. trailing: 999/499, 999/666/333, ... as training "
                                       "previews and the CLI's default. comfyui_turbo: 999/899/799/699 as core "
                                       "SDTurboScheduler, which matches it with the 'euler' sampler "
                                       "(euler_ancestral adds noise and matches only at 1 step). Same at 1 step."),
            ],
            outputs=_outputs("student"),
        )

    @classmethod
    def execute(cls, models, prompt, seed, steps, guidance, width, height, batch_size, concept=None,
                schedule="trailing") -> io.NodeOutput:
        return _run("student", models, prompt, seed, steps, guidance, width, height, batch_size, concept,
                    schedule=schedule)


class TeacherSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        inputs = _common_inputs(25, 200, 7.5)
        inputs.insert(2, io.String.Input("negative_prompt", multiline=True, default="",
                                         tooltip="What the teacher should avoid (used when guidance > 1)."))
        return io.Schema(
            node_id="EchoDistillTeacherSampler",
            display_name="Teacher Sampler (EchoDistill, DDIM)",
            category=CATEGORY,
            description="Draws with the multi-step teacher (DDIM, CFG), to see the echoed teacher.",
            inputs=inputs,
            outputs=_outputs("teacher"),
        )

    @classmethod
    def execute(cls, models, prompt, negative_prompt, seed, steps, guidance, width, height, batch_size,
                concept=None) -> io.NodeOutput:
        return _run("teacher", models, prompt, seed, steps, guidance, width, height, batch_size, concept,
                    negative_prompt=negative_prompt)


NODES = [OneStepSampler, TeacherSampler]
