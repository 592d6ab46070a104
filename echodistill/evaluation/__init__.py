"""Evaluation of generated images against a concept's photos: CLIP-T, CLIP-I and DINO.

    metrics.py   the scorers and `evaluate`

Imports models (the backbones' loader and the tokenizer) and the small utilities only.
"""
