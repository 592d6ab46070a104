"""Export a concept for core ComfyUI nodes, and evaluate concept images."""

from __future__ import annotations

import json
from pathlib import Path

import folder_paths
from comfy_api.latest import io

from echodistill.concepts.export import export_concept
from echodistill.errors import EchoDistillError
from echodistill.evaluation.metrics import evaluate

from . import folders
from .convert import from_comfy_images
from .types import Concept

CATEGORY = "EchoDistill"

# The library's errors name its Python arguments; here they are the nodes' inputs.
INPUT_NAMES = {"overwrite": "overwrite (turn it on)", "clip_path": "a `clip` backbone",
               "dino_path": "a `dino` backbone", "prompts": "the `prompt` input"}


def _in_node_terms(error: EchoDistillError) -> Exception:
    """The same kind of error (FileExistsError stays one), its message in the node's terms."""
    return type(error)(error.in_terms_of(INPUT_NAMES))


class ExportConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EchoDistillExportConcept",
            display_name="Export Concept to LoRA + Embedding",
            category=CATEGORY,
            description="Writes the student's adapters as a kohya LoRA (models/loras) and the token as an embedding "
                        "(models/embeddings): LoraLoader + CLIPTextEncode('embedding:<name>') then reproduce it.",
            inputs=[Concept.Input("concept", tooltip="A trained concept."),
                    io.String.Input("name", default="my_concept", tooltip="File name for both files: letters, digits, _ - . only, "
                                    "so that prompts can say embedding:<name>."),
                    io.Combo.Input("mode", options=["lowrank", "diff"], default="lowrank",
                                   tooltip="lowrank: lora_up/lora_down factors that ComfyUI, diffusers, A1111/Forge "
                                           "and InvokeAI all load. diff: exact weight patches (ComfyUI, A1111/Forge, "
                                           "InvokeAI; diffusers refuses them). At full rank lowrank is exact but "
                                           "LARGER than diff (SD-Turbo K/V: about 165 MiB vs 97.5 MiB); only a low "
                                           "rank makes it smaller, and approximate."),
                    io.Int.Input("rank", default=0, min=0, max=1024,
                                 tooltip="lowrank only: 0 = full rank (exact, larger than diff); e.g. 64 = much "
                                         "smaller, approximate (the error is shown after the run)."),
                    io.Boolean.Input("overwrite", default=False, tooltip="Replace existing files of that name.")],
            outputs=[io.String.Output(display_name="lora_name", tooltip="File in models/loras."),
                     io.String.Output(display_name="embedding_prompt", tooltip="Write this in prompts instead of the token.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, name, **_):
        return folders.check_name(name)

    @classmethod
    def execute(cls, concept, name, mode, rank, overwrite) -> io.NodeOutput:
        lora_dir = Path(folder_paths.get_folder_paths("loras")[0])
        embedding_dir = Path(folder_paths.get_folder_paths("embeddings")[0])
        try:
            rank = (rank or None) if mode == "lowrank" else None  # the widget's rank is for lowrank only
            report, targets = export_concept(concept, name, lora_dir, embedding_dir, mode=mode, rank=rank,
                                             overwrite=overwrite)
        except EchoDistillError as error:
            raise _in_node_terms(error) from error
        return io.NodeOutput(targets.lora.name, targets.prompt_word, ui={"text": [report.summary()]})


class EvaluateConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        backbones = folders.backbone_choices()
        return io.Schema(
            node_id="EchoDistillEvaluateConcept",
            display_name="Evaluate Concept (CLIP-T / CLIP-I / DINO)",
            category=CATEGORY,
            description="Scores generated images against the reference photos as the paper does.",
            inputs=[io.Image.Input("images", tooltip="Generated images."),
                    io.Image.Input("references", tooltip="The concept's real photos."),
                    io.String.Input("prompt", multiline=True, default="a photo of a <v*> dog",
                                    tooltip="The prompt of the images (one line per image, or one for all)."),
                    io.String.Input("token", default="<v*>", tooltip="The concept token (replaced for CLIP-T)."),
                    io.String.Input("class_word", default="dog", tooltip="The subject's class word."),
                    io.Combo.Input("clip", options=backbones, tooltip="CLIP folder (transformers CLIPModel) in models/echodistill/backbones."),
                    io.Combo.Input("dino", options=backbones, tooltip="DINOv2 / DINO folder in models/echodistill/backbones.")],
            outputs=[io.String.Output(display_name="scores", tooltip="The scores as JSON.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, references, prompt, token, class_word, clip, dino) -> io.NodeOutput:
        prompts = [line for line in prompt.splitlines() if line.strip()] or [prompt]
        if len(prompts) == 1:
            prompts = prompts * (images.shape[0] if images.dim() == 4 else 1)
        try:
            scores = evaluate(from_comfy_images(images, "images"), from_comfy_images(references, "references"),
                              prompts, token=token, class_word=class_word,
                              clip_path=None if clip == folders.NONE else folders.find("backbones", clip),
                              dino_path=None if dino == folders.NONE else folders.find("backbones", dino))
        except EchoDistillError as error:
            raise _in_node_terms(error) from error
        text = json.dumps(scores, indent=2)
        return io.NodeOutput(text, ui={"text": [text]})


NODES = [ExportConcept, EvaluateConcept]
