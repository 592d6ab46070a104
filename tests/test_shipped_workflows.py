"""Every shipped workflow runs as shipped, in any order: what a graph loads either ships with the
pack or is written earlier in the same graph."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from echodistill.concepts.bundle import ConceptBundle
from echodistill.jobs.runs import sample
from echodistill.miniworld import SHIPPED_CONCEPT_DIR, STUDENT_DIR, TEACHER_DIR
from echodistill.models.pair import load_model_pair

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
