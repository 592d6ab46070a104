"""Base models, read offline: everything about the frozen teacher, student, text encoder and VAE.

    loading.py           one model from a diffusers folder or a single-file checkpoint
    pair.py              load_model_pair: teacher + student sharing ONE tokenizer and text encoder
    families.py          model families and the configs shipped for them (echodistill/configs/)
    checkpoint_layout.py single-file (LDM / SGM) key names -> diffusers / transformers names
    tensor_files.py      safetensors reading, fingerprints, atomic writes
    tokenizer.py         the shipped CLIP tokenizers
    concept.py           the concept token: its row in the shared text encoder
    adapters.py          trainable adapters wrapping the frozen UNets (Custom Diffusion K/V, LoRA)
    pristine.py          lend a pair to a job and hand it back unchanged
    schedule.py          the DDPM forward process (ᾱ_t, noising, parameterizations)
    diffusion.py         the model calls training and sampling share (prompts, one-step student, teacher x0)
    backbones.py         frozen image backbones (CLIP, DINO, DINOv2) read from local files
    tiny.py              tiny random models for tests and the smoke run

Imports only the small utilities (errors) from the rest of the library.
"""
