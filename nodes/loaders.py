"""Loading nodes: the shared-encoder model pair, discriminator backbones, concept photos."""

from __future__ import annotations

from pathlib import Path

import comfy.model_management
import folder_paths
import torch
from comfy_api.latest import io
from PIL import Image

from echodistill.models.families import FAMILIES
from echodistill.models.pair import load_model_pair
from echodistill.training.data import load_concept_images

from . import folders
from .convert import from_pil
from .types import Backbones, Models

CATEGORY = "EchoDistill"
DTYPES = ["auto", "fp32", "fp16", "bf16"]


def resolve_dtype(choice: str) -> str:
    if choice != "auto":
        return choice
    device = comfy.model_management.get_torch_device()
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


class LoadEchoDistillModels(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        families = folders.family_choices(FAMILIES)
        return io.Schema(
            node_id="EchoDistillLoadModels",
            display_name="Load EchoDistill Models (shared encoder)",
            category=CATEGORY,
            description="Loads a multi-step teacher and a one-step student that share their tokenizer(s) and text "
                        "encoder(s): one for SD 2.1 + SD-Turbo, two (CLIP ViT-L + OpenCLIP ViT-bigG) for SDXL base + "
                        "SDXL-Turbo. A teacher and student of different lines (SD 2.x with SDXL) are refused.",
            inputs=[
                io.Combo.Input("teacher", options=folders.model_choices(),
                               tooltip="Multi-step teacher (SD 2.1, or SDXL base: sd_xl_base_1.0.safetensors): a "
                                       "checkpoint, or a diffusers folder in models/echodistill/diffusers."),
                io.Combo.Input("student", options=folders.model_choices(),
                               tooltip="One-step student (SD-Turbo, or SDXL-Turbo with an SDXL base teacher): a "
                                       "checkpoint, or a diffusers folder."),
                io.Combo.Input("teacher_family", options=families, default="auto",
                               tooltip="Config the teacher is read with; it fixes the prediction type (sd21-768v = v-prediction; "
                                       "auto: SD 2.1 base for SD 2.x files, SDXL base for SDXL files)."),
                io.Combo.Input("student_family", options=families, default="auto",
                               tooltip="Config the student is read with (auto: SD-Turbo for SD 2.x files, SDXL-Turbo for "
                                       "SDXL files)."),
                io.Combo.Input("dtype", options=DTYPES, default="auto",
                               tooltip="Weights precision; auto = bf16/fp16 on CUDA, fp32 on CPU."),
            ],
            outputs=[Models.Output(display_name="models",
                                   tooltip="Teacher + student + their shared text encoder(s): one (SD 2.x), two (SDXL).")],
        )

    @classmethod
    def execute(cls, teacher, student, teacher_family, student_family, dtype) -> io.NodeOutput:
        # ComfyUI runs nodes in inference mode; weights made there could never be trained later.
        with torch.inference_mode(False):
            pair = load_model_pair(folders.resolve_model(teacher), folders.resolve_model(student),
                                   teacher_family=folders.resolve_family(teacher_family),
                                   student_family=folders.resolve_family(student_family),
                                   dtype=resolve_dtype(dtype), device=comfy.model_management.get_torch_device())
        return io.NodeOutput(pair)


class LoadDiscriminatorBackbones(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        backbones = folders.backbone_choices()
        return io.Schema(
            node_id="EchoDistillLoadBackbones",
            display_name="Load Discriminator Backbones",
            category=CATEGORY,
            description="Optional image backbones for the discriminator ensemble; with none, training uses the "
                        "teacher-feature discriminator, which needs no extra weights.",
            inputs=[
                io.Combo.Input("clip_vision", options=[folders.NONE, *folder_paths.get_filename_list("clip_vision")],
                               tooltip="CLIP ViT-H image encoder from models/clip_vision (also drives the semantic loss)."),
                io.Combo.Input("dinov2", options=backbones, tooltip="DINOv2 ViT-L/14 folder or file in models/echodistill/backbones."),
                io.Combo.Input("dino", options=backbones, tooltip="DINO ViT-S/16 folder or file in models/echodistill/backbones."),
                io.Combo.Input("ip_adapter", options=backbones,
                               tooltip="IP-Adapter file whose image projection shapes the CLIP features (optional)."),
                io.Boolean.Input("teacher_features", default=True,
                                 tooltip="Also use the discriminator on the teacher UNet's own features."),
            ],
            outputs=[Backbones.Output(display_name="backbones", tooltip="The chosen discriminator members.")],
        )

    @classmethod
    def execute(cls, clip_vision, dinov2, dino, ip_adapter, teacher_features) -> io.NodeOutput:
        chosen = {}
        if clip_vision != folders.NONE:
            chosen["clip_vit_h14"] = folder_paths.get_full_path_or_raise("clip_vision", clip_vision)
        if dinov2 != folders.NONE:
            chosen["dinov2_vitl14"] = str(folders.find("backbones", dinov2))
        if dino != folders.NONE:
            chosen["dino_vits16"] = str(folders.find("backbones", dino))
        if not chosen and not teacher_features:
            raise ValueError("no discriminator chosen: pick a backbone or keep teacher_features on")
        projection = None if ip_adapter == folders.NONE else str(folders.find("backbones", ip_adapter))
        members = (["teacher_features"] if teacher_features else []) + list(chosen)
        return io.NodeOutput({"members": members, "backbones": chosen, "ip_adapter": projection})


class LoadImagesFromFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EchoDistillLoadImagesFromFolder",
            display_name="Load Images From Folder",
            category=CATEGORY,
            description="Loads the concept photos of a folder inside ComfyUI's input directory as one batch "
                        "(EXIF-rotated, converted to RGB, center-cropped to a square).",
            inputs=[
                io.Combo.Input("folder", options=folders.input_folder_choices(),
                               tooltip="A folder inside ComfyUI's input directory holding 3-20 photos, or a shipped "
                                       "mini-world subject: miniworld/<name>, or miniworld/procedural_<seed> for a fresh "
                                       "procedural subject (seeds 3000000-3099999 were never trained on)."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                             tooltip="Side of the square crops (the training resolution)."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="The photos, one batch."),
                     io.Int.Output(display_name="count", tooltip="How many photos were loaded."),
                     io.String.Output(display_name="captions",
                                      tooltip="One line per photo: its caption from <photo>.txt beside it (the "
                                              "world's grammar for mini-world subjects); empty where it has none."),
                     io.String.Output(display_name="report",
                                      tooltip="Which photos were used, and every file of the folder that was not, "
                                              "with the reason (e.g. a GIF beside the PNGs).")],
        )

    @classmethod
    def validate_inputs(cls, folder, resolution):
        return folders.check_existing(folder)

    @classmethod
    def execute(cls, folder, resolution) -> io.NodeOutput:
        path = folders.safe_join(Path(folder_paths.get_input_directory()), folder)
        shipped = None if path.is_dir() else folders.shipped_references(folder)
        if shipped is not None:
            pictures, captions = shipped
            images = load_concept_images(pictures, captions=captions, resolution=resolution)
        else:
            images = load_concept_images(path, resolution=resolution)
        crops = [_square(item.image, resolution) for item in images]
        captions = "\n".join(" ".join((item.caption or "").split()) for item in images)  # one line each
        report = images.report()
        return io.NodeOutput(torch.cat([from_pil(c) for c in crops]), len(crops), captions, report,
                             ui={"text": [report]})


def _square(picture: Image.Image, size: int) -> Image.Image:
    side = min(picture.size)
    left, top = (picture.width - side) // 2, (picture.height - side) // 2
    return picture.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)


NODES = [LoadEchoDistillModels, LoadDiscriminatorBackbones, LoadImagesFromFolder]
