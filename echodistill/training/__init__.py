"""Training a concept: the teacher and the one-step student together through one text encoder.

    config.py          TrainConfig (typed, checked when built) and the named presets
    photos.py          concept photos and their captions, read from a folder or given as images
    templates.py       the prompt templates a photo is trained with
    data.py            ConceptDataset: augmented batches with validity masks
    losses/            the losses, as pure functions returning per-sample terms
    discriminators/    the discriminator ensemble: frozen backbones with trainable heads
    echo.py            the echo buffer: the student's best samples as extra teacher data
    offload.py         moving frozen modules off the accelerator between stages
    callbacks.py       how a front end observes and steers a run (progress, previews, stop)
    checkpointing.py   resumable checkpoints: what a run saves and how it is restored
    previews.py        one-step preview images while training
    trainer.py         Trainer: one iteration (`train_step`) read top to bottom, and the loop

Imports models, sampling (previews), concepts (the bundle a run ends with) and the small utilities.
"""
