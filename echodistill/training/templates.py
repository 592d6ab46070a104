"""Prompt templates for concept training (DESIGN.md section 1: "25 ImageNet-style templates").

Each template holds exactly one ``{}``, filled with ``"<token> <class word>"`` (e.g.
``"a photo of a <v*> dog"``). The list avoids degrading adjectives ("blurry", "jpeg
corrupted", "pixelated"): the references are clean photos, and pairing such words with them
would teach the teacher that those words mean nothing.
"""

from __future__ import annotations

from echodistill.errors import ConfigError

PLACEHOLDER = "{}"

PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a close-up photo of the {}",
    "a bright photo of a {}",
    "a dark photo of the {}",
    "a cropped photo of a {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a clean photo of a {}",
    "a photo of my {}",
    "a photo of the nice {}",
    "a close-up photo of a {}",
    "a photo of the small {}",
    "a photo of the large {}",
    "a rendition of the {}",
    "a nice photo of a {}",
    "a snapshot of the {}",
    "a picture of a {}",
    "an image of the {}",
    "a photograph of my {}",
    "a detailed photo of the {}",
    "a color photo of a {}",
    "a well-lit photo of the {}",
    "a candid photo of a {}",
    "a portrait of the {}",
)


def subject_phrase(token: str, class_word: str) -> str:
    """``"<token> <class word>"``; just the token when the class word is empty."""
    return " ".join(part for part in (token.strip(), class_word.strip()) if part)


def check_template(template: str) -> None:
    """Raise ConfigError unless ``template`` holds exactly one ``{}``."""
    count = template.count(PLACEHOLDER)
    if count != 1:
        raise ConfigError(
            f"prompt template {template!r} has {count} '{{}}' placeholders; it needs exactly "
            "one, where '<token> <class word>' goes (e.g. 'a photo of a {}')"
        )


def render_prompt(template: str, token: str, class_word: str, prefix: str = "") -> str:
    """Fill ``template`` with ``"<token> <class_word>"`` and put ``prefix`` in front.

    The prefix is one of the augmentation words ("a far away ", "zoomed in ", ...); a missing
    trailing space is added, so ``"close up"`` and ``"close up "`` give the same prompt.
    Only the ``{}`` is replaced (no ``str.format``), so other braces in a template are kept.
    """
    check_template(template)
    if not token.strip():
        raise ConfigError("the concept token is empty; pass the token string, e.g. '<v*>'")
    prompt = template.replace(PLACEHOLDER, subject_phrase(token, class_word))
    prefix = prefix.strip()
    return f"{prefix} {prompt}" if prefix else prompt
