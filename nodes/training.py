"""Train Concept: builds the config from the inputs, calls echodistill.jobs.train_concept, returns."""

from __future__ import annotations

import logging

import comfy.model_management
from comfy_api.latest import io

from echodistill.imaging import loss_curve
from echodistill.jobs.runs import run_key, train_concept
from echodistill.miniworld.recipe import PRESET as MINIWORLD_PRESET
from echodistill.miniworld.recipe import preset_config as miniworld_preset
from echodistill.sampling.samplers import native_resolution
from echodistill.training.callbacks import TrainingCancelled
from echodistill.training.config import PRESETS
from echodistill.training.config import preset as preset_config

from . import folders
from .convert import from_pil, to_comfy_images, to_pil_list
from .progress import ComfyCallbacks
from .types import Backbones, Concept, Models

CATEGORY = "EchoDistill"


class TrainConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EchoDistillTrainConcept",
            display_name="Train Concept (EchoDistill)",
            category=CATEGORY,
            description="Trains the teacher and the one-step student together on a few photos of one subject. "
                        "Cancel saves a resumable checkpoint; an identical finished run is reused.",
            inputs=[
                Models.Input("models", tooltip="From Load EchoDistill Models."),
                io.Image.Input("images", tooltip="3-20 photos of the subject (a batch; e.g. Load Images From Folder)."),
                io.String.Input("token", default="<v*>", tooltip="The new word that will mean your subject in prompts."),
                io.String.Input("class_word", default="dog", tooltip="What the subject is (dog, mug, toy...)."),
                io.Combo.Input("preset", options=[*PRESETS, MINIWORLD_PRESET], default="paper",
                               tooltip="paper: the published defaults; balanced/lite: bf16 + gradient checkpointing "
                                       "for smaller GPUs (load the models in bf16). Estimated peak GPU memory at "
                                       "512 px (docs/memory.md): SD 2.x paper 27 GB, balanced 12, lite 9; SDXL paper "
                                       "54, balanced 30, lite 17 (SDXL's lite trains LoRA K/V). miniworld: the "
                                       "shipped mini world's recipe, as scripts/demo trains (its tuned rates; the "
                                       "echo draws the world's own scenes)."),
                io.Int.Input("steps", default=1000, min=1, max=100000, tooltip="Training iterations (paper: 1000)."),
                io.Int.Input("resolution", default=0, min=0, max=1024, step=64,
                             tooltip="Training resolution in pixels; 0 = the student's native size (512 for "
                                     "SD-Turbo and SDXL-Turbo, 64 for the mini world). SDXL pairs train both UNets at "
                                     "the student's 512 (the teacher reads the student's images at that size)."),
                io.Float.Input("lr_student", default=2e-5, min=1e-7, max=1e-2, step=1e-6, tooltip="Student adapter learning rate."),
                io.Float.Input("lr_teacher", default=1e-5, min=1e-7, max=1e-2, step=1e-6,
                               tooltip="Teacher adapter and token learning rate."),
                io.Float.Input("lr_heads", default=1e-4, min=1e-7, max=1e-2, step=1e-6,
                               tooltip="Discriminator heads learning rate."),
                io.Combo.Input("adapter", options=["preset", "custom_diffusion", "lora"], default="preset",
                               tooltip="preset: the preset's choice (custom_diffusion, except lite on SDXL: lora, to "
                                       "fit 24 GB); custom_diffusion: full cross-attention K/V deltas (paper); lora: "
                                       "peft LoRA on the same K/V."),
                io.Boolean.Input("echo", default=True, tooltip="Feed the student's best images back to the teacher."),
                io.Int.Input("sample_every", default=100, min=0, max=10000, tooltip="Preview image every N steps (0: never)."),
                io.Int.Input("save_every", default=250, min=0, max=10000, tooltip="Resumable checkpoint every N steps."),
                io.Int.Input("seed", default=42, min=0, max=2**31 - 1, tooltip="Changing it trains anew on purpose."),
                io.Boolean.Input("resume", default=True, tooltip="Continue a stopped run of the same settings from its checkpoint."),
                io.Boolean.Input("force", default=False, tooltip="Retrain even if this exact run has finished before."),
                Backbones.Input("backbones", optional=True,
                                tooltip="Optional discriminator backbones; without: the teacher-feature discriminator."),
                io.String.Input("captions", optional=True, multiline=True, default="",
                                tooltip="One line per photo, in batch order ({} stands for the token and class "
                                        "word); e.g. from Load Images From Folder. Empty: the prompt templates."),
                # Advanced, and optional so that workflows saved before they existed load unchanged; 0 keeps
                # the preset's value (lite draws 8 echo samples), as resolution 0 keeps the native size.
                io.Float.Input("augment_min_scale", optional=True, default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Smallest rescale of the shrink/zoom augmentation, as a fraction of the "
                                       "training resolution, in (0, 1]; 0 = the preset's (1/3, Custom "
                                       "Diffusion's). At 64 px (the mini world) use 0.5: shrunk further, a "
                                       "subject spans too few latent cells to keep its detail."),
                io.Int.Input("echo_samples", optional=True, default=0, min=0, max=256,
                             tooltip="Student images drawn per echo round, the best quarter kept for the "
                                     "teacher; 0 = the preset's (paper 16, lite 8; the mini world's recipe 8)."),
                io.Float.Input("lr_token", optional=True, default=0.0, min=0.0, max=1.0, step=1e-5,
                               tooltip="Learning rate of the concept token row alone; 0 = lr_teacher's, as the "
                                       "paper trains it. The row is one vector every prompt with the token reads: "
                                       "the mini world trains it at a higher rate than its adapters."),
            ],
            outputs=[
                Concept.Output(display_name="concept", tooltip="The trained concept (token + both adapters)."),
                io.Image.Output(display_name="loss_curve", tooltip="Teacher, student and discriminator losses."),
                io.Image.Output(display_name="preview", tooltip="One-step student images of the concept."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, models, images, token, class_word, preset, steps, resolution, lr_student, lr_teacher, lr_heads,
                adapter, echo, sample_every, save_every, seed, resume, force, backbones=None,
                captions="", augment_min_scale=0.0, echo_samples=0, lr_token=0.0) -> io.NodeOutput:
        members = backbones["members"] if backbones else ["teacher_features"]
        resolution = resolution or native_resolution(models, "student")
        chosen_adapter = {} if adapter == "preset" else {"adapter": adapter}
        advanced = {name: value for name, value in (("augment_min_scale", augment_min_scale),
                                                     ("echo_samples", echo_samples), ("lr_token", lr_token))
                    if value}  # 0: the preset's
        values = dict(steps=steps, resolution=resolution, token=token, class_word=class_word, lr_student=lr_student,
                      lr_teacher=lr_teacher, lr_heads=lr_heads, echo=echo, sample_every=sample_every,
                      save_every=save_every, seed=seed, discriminators=tuple(members), **chosen_adapter, **advanced)
        if preset == MINIWORLD_PRESET:  # the demo's recipe, every value the node shows over it
            config = miniworld_preset(values)
        else:
            config = preset_config(preset, line="sdxl" if models.is_sdxl else "sd", **values)
        photos = to_pil_list(images)
        per_photo = photo_captions(captions, len(photos))
        paths = dict(backbones["backbones"]) if backbones else {}
        ip_adapter = backbones["ip_adapter"] if backbones else None
        run_dir = folders.writable("runs") / run_key(models, photos, config,
                                                     {"backbones": paths, "ip": ip_adapter, "captions": per_photo})
        comfy.model_management.unload_all_models()  # our models are not ComfyUI-managed: make room first
        comfy.model_management.soft_empty_cache()
        callbacks = ComfyCallbacks(steps, cls.hidden.unique_id if cls.hidden else None)
        try:
            result = train_concept(models, photos, config, run_dir=run_dir, callbacks=callbacks, resume=resume,
                                   reuse_finished=not force, backbone_paths=paths, ip_adapter_path=ip_adapter,
                                   captions=per_photo)
        except TrainingCancelled as cancelled:
            logging.info("EchoDistill: training cancelled at step %d; checkpoint %s", cancelled.step, cancelled.checkpoint)
            raise comfy.model_management.InterruptProcessingException() from cancelled
        if result.reused:
            logging.info("EchoDistill: reusing the finished run in %s (set force to retrain)", run_dir)
        elif result.resumed_from:
            logging.info("EchoDistill: resumed from step %d of %s", result.resumed_from, run_dir)
        return io.NodeOutput(result.bundle, from_pil(loss_curve(result.history)), to_comfy_images(result.preview))


def photo_captions(text: str, count: int) -> list[str | None] | None:
    """The captions input as one caption per photo (None: templates for that photo), or None if blank."""
    if not text.strip():
        return None
    lines = text.strip("\n").split("\n")
    if len(lines) != count:
        raise ValueError(f"captions has {len(lines)} lines for {count} photos: write one line per photo, in batch "
                         "order (an empty line keeps the prompt templates for that photo), or leave it empty")
    return [line.strip() or None for line in lines]


NODES = [TrainConcept]
