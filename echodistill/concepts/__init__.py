"""What training produces: the concept bundle and its export to files core ComfyUI nodes load.

    bundle.py    ConceptBundle: token row, adapter weights, base-model fingerprints, config, in one file
    export.py    export_lora (kohya LoRA, exact or low rank) and export_embedding
    reference.py apply_kohya_lora: a strict reference applier of the exported LoRA, as ComfyUI applies it

Imports models and the small utilities only.
"""
