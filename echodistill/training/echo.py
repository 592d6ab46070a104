"""Echo: the student's best fast generations, kept to refine the teacher (DESIGN §1 step 6).

Each echo round the student draws many concept images in new contexts; they are ranked by
how real the discriminators find them plus how close they are to the reference images, and
the best fraction joins a bounded buffer. Teacher batches then take a few buffered samples,
weighted by `echo_weight`. Echoed samples live only here: the discriminators' "real" side is
always the reference photos.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .templates import render_prompt


def echo_prompt(templates: tuple[str, ...], token: str, class_word: str, context_index: int) -> str:
    """The `context_index`-th (cyclically) of the echo's prompt templates (TrainConfig.echo_prompts), filled
    with "<token> <class word>". Raises ConfigError for a template without exactly one "{}"."""
    return render_prompt(templates[context_index % len(templates)], token, class_word)


def select_best(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Indices of the top ceil(keep_ratio · N) scores, best first."""
    keep = max(1, int(torch.ceil(torch.tensor(keep_ratio * scores.numel())).item()))
    return torch.argsort(scores, descending=True)[:keep]


@dataclass
class EchoBuffer:
    """A FIFO of echoed latents (kept on the CPU) and their prompts."""

    capacity: int
    latents: list[torch.Tensor] = field(default_factory=list)  # each (4, h, w)
    prompts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.latents)

    def add(self, latents: torch.Tensor, prompts: list[str]) -> None:
        for latent, prompt in zip(latents.detach().float().cpu(), prompts):
            self.latents.append(latent)
            self.prompts.append(prompt)
        overflow = len(self.latents) - self.capacity
        if overflow > 0:
            del self.latents[:overflow], self.prompts[:overflow]

    def sample(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        picks = torch.randint(len(self.latents), (count,), generator=generator).tolist()
        return torch.stack([self.latents[i] for i in picks]), [self.prompts[i] for i in picks]

    def state_dict(self) -> dict:
        stacked = torch.stack(self.latents) if self.latents else torch.empty(0)
        return {"latents": stacked, "prompts": list(self.prompts)}

    def load_state_dict(self, state: dict) -> None:
        self.latents = list(state["latents"]) if state["latents"].numel() else []
        self.prompts = list(state["prompts"])
