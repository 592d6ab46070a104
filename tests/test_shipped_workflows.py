"""Every shipped workflow runs as shipped, in any order: what a graph loads either ships with the
pack or is written earlier in the same graph."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from echodistill.concepts.bundle import ConceptBundle
from echodistill.jobs.runs import sample
from echodistill.miniworld import SHIPPED_CONCEPT_DIR, STUDENT_DIR, TEACHER_DIR
from echodistill.miniworld.procedural import lookup_subject
from echodistill.miniworld.recipe import DEMO_SEED, DEMO_STEPS, tuned_config
from echodistill.miniworld.recipe import preset_config as miniworld_preset
from echodistill.models.pair import load_model_pair
from echodistill.training.config import TrainConfig

GRAPHS = Path(__file__).parent / "api_graphs"
SHIPPED_PREFIX = "miniworld/"


def _graphs() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(GRAPHS.glob("*.json"))}


@pytest.mark.parametrize("name", sorted(_graphs()))
def test_concepts_a_workflow_loads_ship_or_are_saved_by_it(name):
    graph = _graphs()[name]
    saved = {f"{n['inputs']['name']}.safetensors" for n in graph.values() if n["class_type"] == "EchoDistillSaveConcept"}
    for node in graph.values():
        if node["class_type"] == "EchoDistillLoadConcept":
            concept = node["inputs"]["concept_name"]
            assert concept in saved or (concept.startswith(SHIPPED_PREFIX) and (
                SHIPPED_CONCEPT_DIR / concept[len(SHIPPED_PREFIX):]).is_file()), (
                f"{name} loads {concept!r}, which a fresh install does not have")


def test_the_shipped_concept_draws_on_the_shipped_pair():
    bundles = sorted(SHIPPED_CONCEPT_DIR.glob("*.safetensors"))
    assert bundles, "no concept ships with the pack"
    pair = load_model_pair(TEACHER_DIR, STUDENT_DIR)
    for path in bundles:
        bundle = ConceptBundle.load(path)
        bundle.check_base(pair, ("student", "teacher"))  # trained on exactly these models
        result = sample(pair, [f"a small {bundle.token} {bundle.class_word} at the top, on a plain green background"],
                        concept=bundle, seeds=[5], width=64, height=64)
        assert result.images.shape == (1, 3, 64, 64)
        assert path.stat().st_size < 2_000_000  # small enough to ship


@pytest.mark.parametrize("name", sorted(_graphs()))
def test_workflows_say_what_each_part_does(name):
    """Groups around the parts, and every image output titled with what it shows."""
    workflow = json.loads((Path(__file__).resolve().parents[1] / "workflows" / f"{name}.json").read_text())
    assert workflow.get("groups"), f"{name} has no groups"
    grouped = set()
    for group in workflow["groups"]:
        x, y, w, h = group["bounding"]
        grouped |= {n["id"] for n in workflow["nodes"] if x <= n["pos"][0] <= x + w and y <= n["pos"][1] <= y + h}
    assert grouped == {n["id"] for n in workflow["nodes"]}, f"{name}: nodes outside every group"
    for node in workflow["nodes"]:
        if node["type"] in ("PreviewImage", "SaveImage"):
            assert node.get("title"), f"{name}: an unlabelled {node['type']} (node {node['id']})"
    assert workflow["extra"]["echodistill"]["description"]


def _widget_values(node: dict) -> dict:
    """A UI-format node's widget values by input name (the frontend stores them in order, a seed's
    "control after generate" right after it)."""
    values = list(node["widgets_values"])
    named = {}
    for port in node["inputs"]:
        if "widget" in port:
            named[port["name"]] = values.pop(0)
            if port["name"] == "seed":
                values.pop(0)
    assert values == [], f"unread widget values {values}"
    return named


def test_the_mini_world_workflow_trains_exactly_as_the_demo_does():
    workflow = json.loads((Path(__file__).resolve().parents[1] / "workflows" /
                           "echodistill_train_and_sample.json").read_text())
    nodes = {n["type"]: _widget_values(n) for n in workflow["nodes"]
             if n["type"] in ("EchoDistillTrainConcept", "EchoDistillLoadImagesFromFolder")}
    train, folder = nodes["EchoDistillTrainConcept"], nodes["EchoDistillLoadImagesFromFolder"]["folder"]
    demo = tuned_config(lookup_subject(folder.removeprefix("miniworld/")).class_word, DEMO_STEPS, DEMO_SEED)
    # The node's config: the preset, then each input named as a config field (0 keeps the preset's value).
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    shown = {k: v for k, v in train.items()
             if k in fields and not (k in ("augment_min_scale", "echo_samples", "lr_token") and v == 0)}
    assert train["preset"] == "miniworld"  # the recipe's own fields (the echo's scenes) come with the preset
    config = miniworld_preset(shown)

    def same(a, b) -> bool:
        return math.isclose(a, b, rel_tol=1e-6) if isinstance(a, float) else a == b

    differing = {name for name in fields if not same(getattr(config, name), getattr(demo, name))}
    # Previews every 50 steps and a checkpoint every 100: what the workflow shows; they change no training.
    assert differing == {"sample_every", "save_every"}, {n: (getattr(config, n), getattr(demo, n)) for n in differing}
    assert config.augment_min_scale == 1.0 and config.echo_samples == 8 and config.seed == DEMO_SEED
    assert config.lr_token == 1e-3 and config.steps == DEMO_STEPS == 400
