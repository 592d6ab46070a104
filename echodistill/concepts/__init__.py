"""What training produces: the concept bundle and its export to files core ComfyUI nodes load.

    bundle.py    ConceptBundle: token row, adapter weights, base-model fingerprints, config, in one file
    export.py    export_lora (kohya LoRA, exact or low rank) and export_embedding (SD: one row; SDXL: clip_l + clip_g)
    kohya_keys.py the kohya key of each UNet module (diffusers paths for SD 1.x / 2.x, SGM paths for SDXL)
                 and the UNet an export must fit
    reference.py apply_kohya_lora: a strict reference applier of the exported LoRA, as ComfyUI applies it

Imports models and the small utilities only.
"""
