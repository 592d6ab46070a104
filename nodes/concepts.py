"""Save / Load Concept: bundles in models/echodistill/concepts; names cannot leave that folder."""

from __future__ import annotations

from comfy_api.latest import io

from echodistill.concepts.export import load_checked_bundle
from echodistill.files import check_name

from . import folders
from .types import Concept

CATEGORY = "EchoDistill"


class SaveConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EchoDistillSaveConcept",
            display_name="Save Concept",
            category=CATEGORY,
            description="Writes the concept bundle to models/echodistill/concepts/<name>.safetensors.",
            inputs=[Concept.Input("concept", tooltip="A trained concept."),
                    io.String.Input("name", default="my_concept", tooltip="File name: letters, digits, _ - . only."),
                    io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name.")],
            outputs=[io.String.Output(display_name="file", tooltip="The file written.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, name, **_):
        return folders.check_name(name)

    @classmethod
    def execute(cls, concept, name, overwrite) -> io.NodeOutput:
        file = f"{check_name(name)}.safetensors"
        path = folders.safe_join(folders.writable("concepts"), file)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{file} already exists in {path.parent}; pick another name or set overwrite")
        concept.save(path)
        return io.NodeOutput(file, ui={"text": [f"saved {file}"]})


class LoadConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EchoDistillLoadConcept",
            display_name="Load Concept",
            category=CATEGORY,
            description="Loads a concept bundle from models/echodistill/concepts, or one shipped with the pack "
                        "(miniworld/<subject>.safetensors, trained on the shipped mini-world models).",
            inputs=[io.Combo.Input("concept_name", options=folders.concept_choices(),
                                   tooltip="A file in models/echodistill/concepts (Save Concept writes there), or a "
                                           "shipped mini-world concept (miniworld/...), which runs on a fresh install.")],
            outputs=[Concept.Output(display_name="concept", tooltip="The concept (token, embedding, adapters).")],
        )

    @classmethod
    def validate_inputs(cls, concept_name):
        return folders.check_existing(concept_name)

    @classmethod
    def execute(cls, concept_name) -> io.NodeOutput:
        # Checked against the UNet configs it stores: an edited file is refused here, naming itself and the misfit,
        # not later in a sampler as a bare shape error.
        return io.NodeOutput(load_checked_bundle(folders.find_concept(concept_name)))


NODES = [SaveConcept, LoadConcept]
