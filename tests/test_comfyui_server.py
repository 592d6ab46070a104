"""The node pack in a real ComfyUI 0.3.75 server: every example graph, progress, interrupt, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safetensors import safe_open

from echodistill.concepts.bundle import ConceptBundle
from echodistill.training.checkpointing import TrainingCheckpoint

GRAPHS = Path(__file__).parent / "api_graphs"


def graph(name: str) -> dict:
    return json.loads((GRAPHS / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def server(prepared_server):
    return prepared_server


def _outputs(entry: dict, node: str) -> list[dict]:
    return entry["outputs"][node]["images"]


def test_the_pack_registers_every_node_with_tooltips(server):
    info = server.get("/object_info")
    ours = {k: v for k, v in info.items() if k.startswith("EchoDistill")}
    assert len(ours) == 10
    for name, node in ours.items():
        assert node["category"] == "EchoDistill"
        for section in ("required", "optional"):
            for port, spec in node["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{name}.{port}"
        assert all(node["output_tooltips"]), name
    assert "diffusers/tiny-teacher" in ours["EchoDistillLoadModels"]["input"]["required"]["teacher"][1]["options"]


def test_train_and_sample_streams_progress_and_previews(server):
    fresh = graph("echodistill_train_and_sample")
    fresh["3"]["inputs"]["seed"] = 11  # a run no other test (browser, in-process) has cached
    prompt_id, messages, binary = server.run_watching(fresh)
    assert messages[-1]["type"] == "execution_success", messages[-3:]
    progress = [m["data"] for m in messages if m["type"] == "progress" and m["data"]["node"] == "3"]
    assert [p["value"] for p in progress][-1] == 3 and progress[-1]["max"] == 3
    assert 2 in binary or 1 in binary  # preview frames (ComfyUI sends them as binary websocket events)
    assert 3 in binary  # the losses as progress text
    entry = server.wait(prompt_id)  # the websocket can report success before the history is stored
    images = _outputs(entry, "5")
    assert len(images) == 2
    png = server.get(f"/view?filename={images[0]['filename']}&subfolder={images[0]['subfolder']}&type=output")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # Queued again unchanged: ComfyUI's cache answers, nothing retrains.
    _, again, _ = server.run_watching(fresh)
    cached = [m for m in again if m["type"] == "execution_cached"]
    assert cached and "3" in cached[0]["data"]["nodes"]


def test_saved_concept_samples_in_one_step(server):
    entry = server.run(graph("echodistill_sample_saved_concept"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert len(_outputs(entry, "4")) == 1 and len(_outputs(entry, "6")) == 1


def test_train_export_then_core_nodes_only(server):
    entry = server.run(graph("echodistill_train_and_export"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    before = len(server.log_text())
    entry = server.run(graph("core_nodes_sample_exported_concept"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert "lora key not loaded" not in server.log_text()[before:]
    assert len(_outputs(entry, "10")) == 1


def test_sdxl_train_and_sample_runs_with_the_packs_nodes(server, comfy_models):
    entry = server.run(graph("echodistill_sdxl_train_and_sample"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert len(_outputs(entry, "5")) == 1 and len(_outputs(entry, "7")) == 2  # the sample; the last preview
    saved = ConceptBundle.load(comfy_models["echodistill"] / "concepts" / "my_mug_xl.safetensors")
    assert saved.is_sdxl and saved.families == {"teacher": "tiny-sdxl", "student": "tiny-sdxl-turbo"}
    # exported for the core-nodes SDXL graph: SGM kohya keys, an embedding with both encoders' rows
    models = server.base / "models"  # where the Export node writes: ComfyUI's first folder of each kind
    with safe_open(str(models / "loras" / "my_mug_xl.safetensors"), "pt") as lora:
        assert any(k.startswith("lora_unet_input_blocks_") for k in lora.keys())
    with safe_open(str(models / "embeddings" / "my_mug_xl.safetensors"), "pt") as embedding:
        assert set(embedding.keys()) == {"clip_l", "clip_g"}


def test_the_sdxl_core_nodes_graph_validates_up_to_the_files_it_needs(server):
    """Every node and value is valid in a real ComfyUI; only the SDXL-Turbo checkpoint, which no test machine
    has (and the exported LoRA, until the SDXL training graph has exported it), is refused, by name, before
    anything runs."""
    exported = (server.base / "models" / "loras" / "my_mug_xl.safetensors").is_file()
    status, answer = server.post("/prompt", {"prompt": graph("core_nodes_sample_exported_sdxl_concept")})
    assert status == 400, answer
    errors = answer["node_errors"]
    assert set(errors) == ({"1"} if exported else {"1", "2"}), errors  # the loaders; every other node is valid
    assert all(e["dependent_outputs"] == ["8"] for e in errors.values())
    details = json.dumps(errors)
    assert "ckpt_name: 'sd_xl_turbo_1.0_fp16.safetensors' not in" in details, details
    assert ("lora_name: 'my_mug_xl.safetensors' not in" in details) == (not exported), details
    assert server.get("/system_stats")["system"]


def test_interrupt_leaves_a_checkpoint_that_resumes(server, comfy_models):
    long_run = graph("echodistill_train_and_sample")
    train = long_run["3"]["inputs"]
    train.update(steps=30, seed=7, sample_every=0, echo=False)
    for node in ("4", "5", "6", "7", "8"):
        del long_run[node]
    long_run["9"] = {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}}

    def after_two_steps(message):
        return message["type"] == "progress" and message["data"]["node"] == "3" and message["data"]["value"] >= 2

    runs = comfy_models["echodistill"] / "runs"
    earlier = {p: p.stat().st_mtime_ns for p in runs.glob("*/checkpoint.pt")}  # every finished run ends with one
    _, messages, _ = server.run_watching(long_run, interrupt_when=after_two_steps)
    assert messages[-1]["type"] == "execution_interrupted", messages[-3:]
    checkpoints = [p for p in runs.glob("*/checkpoint.pt") if earlier.get(p) != p.stat().st_mtime_ns]
    assert len(checkpoints) == 1, "Cancel must leave exactly this run's checkpoint"
    stopped_at = TrainingCheckpoint.load(checkpoints[0]).step
    assert 2 <= stopped_at < 30

    before = len(server.log_text())  # queued again unchanged: the same run, resumed
    entry = server.run(long_run)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert f"resumed from step {stopped_at} of" in server.log_text()[before:]
    assert ConceptBundle.load(checkpoints[0].parent / "concept.safetensors").step == 30


@pytest.mark.parametrize(
    ("graph_name", "change", "message"),
    [
        ("echodistill_train_and_sample", {"2": {"folder": "empty_photos"}}, "no usable image"),
        ("echodistill_train_and_sample", {"1": {"teacher": "diffusers/tiny-sd15"}}, "trains one shared text encoder"),
    ],
)
def test_bad_inputs_are_clear_node_errors_and_the_server_keeps_serving(server, graph_name, change, message):
    bad = graph(graph_name)
    for node, inputs in change.items():
        bad[node]["inputs"].update(inputs)
    entry = server.run(bad)
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and message in errors[0]["exception_message"], errors
    assert server.get("/system_stats")["system"]


@pytest.mark.parametrize(("node", "field", "status", "message"), [
    ("8", "name", 200, "'../escape' cannot be used: a name is one file name"),  # a name the pack writes
    ("2", "folder", 400, "is not a name inside"),  # a folder it reads
])
def test_names_that_escape_their_folder_are_refused_before_running(server, comfy_models, node, field, status,
                                                                   message):
    """ComfyUI still runs the graph's other outputs (200) unless every output depends on the bad node (400)."""
    bad = graph("echodistill_train_and_sample")
    bad[node]["inputs"][field] = "../escape"
    answer_status, answer = server.post("/prompt", {"prompt": bad})
    assert answer_status == status
    assert node in answer["node_errors"]
    assert message in json.dumps(answer["node_errors"][node])
    if answer_status == 200:
        server.wait(answer["prompt_id"])
    assert not (comfy_models["echodistill"] / "escape.safetensors").exists()
    assert server.get("/system_stats")["system"]
