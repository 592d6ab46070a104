"""The pack's own socket types."""

from comfy_api.latest import io

Models = io.Custom("ECHODISTILL_MODELS")  # echodistill.models.pair.ModelPair: teacher + student + shared text encoder(s)
Concept = io.Custom("ECHODISTILL_CONCEPT")  # echodistill.concepts.bundle.ConceptBundle
Backbones = io.Custom("ECHODISTILL_BACKBONES")  # {"backbones": {name: path}, "ip_adapter": path | None}
