"""Every example workflow in the real ComfyUI frontend (headless Chromium): load, check, queue, see."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from browser_support import launch_page

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "test-output" / "screenshots"
ORDER = [  # later workflows use what earlier ones saved or exported
    "echodistill_train_and_sample",
    "echodistill_sample_saved_concept",
    "echodistill_train_and_export",
    "core_nodes_sample_exported_concept",
    "echodistill_sdxl_train_and_sample",
    "core_nodes_sample_exported_sdxl_concept",
]
# Workflows for files no test machine has (real SDXL-Turbo weights; the SDXL concept's LoRA until the SDXL
# training graph has exported it): they load and queue, and ComfyUI refuses them before running, naming each
# missing file. message -> (models folder, file name)
NEEDS_REAL_FILES = {
    "core_nodes_sample_exported_sdxl_concept": {
        "ckpt_name: 'sd_xl_turbo_1.0_fp16.safetensors' not in": ("checkpoints", "sd_xl_turbo_1.0_fp16.safetensors"),
        "lora_name: 'my_mug_xl.safetensors' not in": ("loras", "my_mug_xl.safetensors"),
    },
}

SET_TEST_VALUES = """([values]) => {
    for (const [id, inputs] of Object.entries(values)) {
        const node = app.graph.getNodeById(Number(id));
        if (!node) throw new Error(`workflow has no node ${id}`);
        for (const [name, value] of Object.entries(inputs)) {
            if (Array.isArray(value)) continue;  // a link, already in the workflow
            const widget = (node.widgets ?? []).find(w => w.name === name);
            if (!widget) throw new Error(`node ${id} (${node.type}) has no widget ${name}`);
            widget.value = value;
        }
    }
}"""


@pytest.fixture(scope="module")
def page(prepared_server):
    with launch_page(prepared_server.url) as page:
        yield page


def _visible_dialogs(page, chars: int = 300) -> list[str]:
    """Dialogs, modals and alert toasts on screen (the frontend reports workflow problems in toasts)."""
    return page.evaluate("""(chars) => [...document.querySelectorAll('.p-dialog, .comfy-modal, .p-toast-message')]
        .filter(d => d.offsetParent !== null).map(d => d.innerText.slice(0, chars))""", chars)


def test_example_workflows_are_exactly_the_tested_graphs():
    shipped = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
    assert shipped == sorted(ORDER)
    for name in ORDER:
        workflow = json.loads((REPO / "workflows" / f"{name}.json").read_text())
        api = json.loads((REPO / "tests" / "api_graphs" / f"{name}.json").read_text())
        assert {str(n["id"]): n["type"] for n in workflow["nodes"]} == {k: v["class_type"] for k, v in api.items()}
        for model in workflow["models"]:
            assert model["url"].startswith("https://") and model["directory"] == "checkpoints"


@pytest.mark.parametrize("name", ORDER)
def test_workflow_loads_queues_and_renders(name, page, prepared_server, comfy_models):
    workflow = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    api = json.loads((REPO / "tests" / "api_graphs" / f"{name}.json").read_text())
    page.evaluate("async ([w, n]) => { await app.loadGraphData(w, true, true, n); }", [workflow, name])
    missing = page.evaluate("(types) => types.filter(t => !LiteGraph.registered_node_types[t])",
                            [n["type"] for n in workflow["nodes"]])
    assert missing == []
    assert _visible_dialogs(page) == []

    # The workflow's user-facing values (real SD 2.1 / SD-Turbo names, 512 px) become the test's tiny ones.
    page.evaluate(SET_TEST_VALUES, [{k: v["inputs"] for k, v in api.items()}])
    before = set(prepared_server.get("/history"))
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    if name in NEEDS_REAL_FILES:
        missing = [message for message, (kind, file) in NEEDS_REAL_FILES[name].items()
                   if not any((folder / kind / file).is_file()
                              for folder in (prepared_server.base / "models", comfy_models[kind].parent))]
        _refused_naming_missing_files(page, prepared_server, name, before, missing)
        return
    deadline = time.monotonic() + 600
    entry = None
    while time.monotonic() < deadline:
        new = set(prepared_server.get("/history")) - before
        if new:
            entry = prepared_server.get("/history")[new.pop()]
            if entry["status"].get("completed") is not None:
                break
        time.sleep(0.5)
    assert entry is not None and entry["status"]["status_str"] == "success", entry and entry["status"]
    image_nodes = [k for k, v in api.items() if v["class_type"] in ("SaveImage", "PreviewImage")]
    assert entry["outputs"] and all(entry["outputs"][k]["images"] for k in image_nodes)
    assert _visible_dialogs(page) == []
    assert not [e for e in page.errors if "api.comfy.org" not in e]
    page.wait_for_timeout(300)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def _refused_naming_missing_files(page, server, name: str, history_before: set, missing: list[str]) -> None:
    """The frontend shows ComfyUI's validation error naming every missing file; nothing is queued."""
    deadline = time.monotonic() + 60
    dialogs: list[str] = []
    while time.monotonic() < deadline and not dialogs:
        page.wait_for_timeout(300)
        dialogs = _visible_dialogs(page, chars=2000)
    text = " ".join(dialogs)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))
    assert "Prompt outputs failed validation" in text and text.count("Value not in list") == len(missing), dialogs
    assert missing and all(message in text for message in missing), dialogs
    assert set(server.get("/history")) == history_before
    page.keyboard.press("Escape")
    page.wait_for_timeout(300)
    assert _visible_dialogs(page) == []
