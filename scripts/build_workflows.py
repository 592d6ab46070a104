"""Write the example workflows (ComfyUI UI/save format) from the API graphs the tests run.

The API graphs in tests/api_graphs/ are the source of truth: they run end to end in the test
suite. This script swaps their test-only values for what a user starts from, lets the real
ComfyUI frontend lay them out and serialize them (so the UI format is exactly what ComfyUI
writes), adds the `models` list, and saves workflows/<name>.json plus a screenshot in docs/.

    .venv/bin/python scripts/build_workflows.py        # needs scripts/bootstrap test (with Chromium)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import comfy_support  # noqa: E402
from browser_support import launch_page  # noqa: E402

from echodistill.miniworld.recipe import DEMO_SEED, DEMO_STEPS, tuned_config  # noqa: E402
from echodistill.models.tensor_files import atomic_write_text  # noqa: E402

SD21 = {
    "name": "v2-1_512-ema-pruned.safetensors",
    "url": "https://huggingface.co/stabilityai/stable-diffusion-2-1-base/resolve/main/v2-1_512-ema-pruned.safetensors",
    "directory": "checkpoints",
}
SD_TURBO = {
    "name": "sd_turbo.safetensors",
    "url": "https://huggingface.co/stabilityai/sd-turbo/resolve/main/sd_turbo.safetensors",
    "directory": "checkpoints",
}

SDXL_BASE = {
    "name": "sd_xl_base_1.0.safetensors",
    "url": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
    "directory": "checkpoints",
}
SDXL_TURBO = {
    "name": "sd_xl_turbo_1.0_fp16.safetensors",
    "url": "https://huggingface.co/stabilityai/sdxl-turbo/resolve/main/sd_xl_turbo_1.0_fp16.safetensors",
    "directory": "checkpoints",
}
MODEL_FILES = (SD21, SD_TURBO, SDXL_BASE, SDXL_TURBO)

# (class_type, input) -> the value a user starts from, in a graph on SD 2.1 + SD-Turbo
SD_USER_VALUES = {
    ("EchoDistillLoadModels", "teacher"): SD21["name"],
    ("EchoDistillLoadModels", "student"): SD_TURBO["name"],
    ("EchoDistillLoadModels", "teacher_family"): "auto",
    ("EchoDistillLoadModels", "student_family"): "auto",
    ("EchoDistillLoadImagesFromFolder", "resolution"): 512,
    ("EchoDistillTrainConcept", "steps"): 1000,
    ("EchoDistillTrainConcept", "resolution"): 512,
    ("EchoDistillTrainConcept", "sample_every"): 100,
    ("EchoDistillTrainConcept", "save_every"): 250,
    ("EchoDistillTrainConcept", "echo"): True,
    ("EchoDistillOneStepSampler", "width"): 512,
    ("EchoDistillOneStepSampler", "height"): 512,
    ("EchoDistillTeacherSampler", "width"): 512,
    ("EchoDistillTeacherSampler", "height"): 512,
    ("EchoDistillTeacherSampler", "steps"): 25,
    ("EchoDistillExportConcept", "name"): "my_mug",
    ("CheckpointLoaderSimple", "ckpt_name"): SD_TURBO["name"],
    ("LoraLoader", "lora_name"): "my_mug.safetensors",
    ("EmptyLatentImage", "width"): 512,
    ("EmptyLatentImage", "height"): 512,
}
TEXT_SWAPS = {"embedding:mini_mug": "embedding:my_mug"}

# ... in a graph on SDXL base + SDXL-Turbo: both train at the student's 512 px (docs/memory.md says why), with
# the preset that fits a 24 GB card.
SDXL_USER_VALUES = {
    **SD_USER_VALUES,
    ("EchoDistillLoadModels", "teacher"): SDXL_BASE["name"],
    ("EchoDistillLoadModels", "student"): SDXL_TURBO["name"],
    ("EchoDistillTrainConcept", "preset"): "lite",
    ("EchoDistillTrainConcept", "adapter"): "preset",
    ("CheckpointLoaderSimple", "ckpt_name"): SDXL_TURBO["name"],
    ("EchoDistillExportConcept", "name"): "my_mug_xl",
    ("LoraLoader", "lora_name"): "my_mug_xl.safetensors",
}

# ... and in a graph on the shipped mini world (64×64 pictures; runs with no downloads, in minutes on a CPU)
# The mini world trains exactly as `scripts/demo` (and bench quality) train it: every training field of the
# demo's config (its steps, seed, tuned rates, echo samples, augmentation bound). Only what the workflow shows
# differs: previews every 50 steps and a checkpoint every 100 (the demo draws neither; neither changes training).
_DEMO = tuned_config("any", DEMO_STEPS, DEMO_SEED)
MINIWORLD_USER_VALUES = {
    **{("EchoDistillTrainConcept", field): getattr(_DEMO, field)
       for field in ("steps", "seed", "lr_student", "lr_teacher", "lr_heads", "adapter", "echo", "echo_samples",
                     "augment_min_scale", "lr_token")},
    ("EchoDistillTrainConcept", "preset"): "miniworld",
    ("EchoDistillTrainConcept", "sample_every"): 50,
    ("EchoDistillTrainConcept", "save_every"): 100,
    ("EchoDistillOneStepSampler", "batch_size"): 4,
    ("EchoDistillTeacherSampler", "steps"): 25,
}


def on_miniworld(graph: dict) -> bool:
    return any(str(v).startswith("miniworld/") for n in graph.values() for v in n["inputs"].values())

DESCRIPTIONS = {
    "echodistill_train_and_sample": "Train a concept, then draw it in one step. Runs as shipped on the mini world "
                                    "(a held-out subject, no downloads); pick SD 2.1 + SD-Turbo and your photos' "
                                    "folder for real pictures.",
    "echodistill_sample_saved_concept": "Draw a saved concept in one step with the student, and with the teacher. As "
                                        "shipped it loads miniworld/checker_diamond.safetensors, a concept trained on "
                                        "the shipped mini world, so it runs on a fresh install; pick "
                                        "my_diamond.safetensors after running echodistill_train_and_sample to draw "
                                        "yours.",
    "echodistill_train_and_export": "Train a concept and export it as a LoRA + embedding for core nodes.",
    "core_nodes_sample_exported_concept": "Core nodes only: SD-Turbo + the exported LoRA + embedding:my_mug, one step.",
    "echodistill_sdxl_train_and_sample": "SDXL: train a concept on SDXL base (teacher) + SDXL-Turbo (student), which "
                                         "share both text encoders, then draw it in one step at 512 px; preset lite "
                                         "(about 17 GB estimated peak, a 24 GB card). Saved and exported as my_mug_xl "
                                         "(LoRA + embedding) for core_nodes_sample_exported_sdxl_concept.",
    "core_nodes_sample_exported_sdxl_concept": "Core nodes only: SDXL-Turbo + an exported SDXL concept's LoRA + "
                                               "embedding:my_mug_xl (clip_l and clip_g rows), one step at 512 px: "
                                               "KSampler with euler + sgm_uniform at cfg 1 is our student's t = 999 "
                                               "step.",
}

# Groups drawn around the parts of each graph (short titles: the node titles and the workflow's
# description say where inputs come from).
GROUPS = {
    "echodistill_train_and_sample": [("1. Models + photos", ["1", "2"]), ("2. Train (echo from half-way)", ["3"]),
                                     ("3. Draw, watch, save", ["4", "5", "6", "7", "8"])],
    "echodistill_sample_saved_concept": [("1. Models + saved concept", ["1", "2"]),
                                         ("2. Student and teacher", ["3", "4", "5", "6"])],
    "echodistill_train_and_export": [("1. Models + your photos", ["1", "2"]), ("2. Train + export", ["3", "4"])],
    "core_nodes_sample_exported_concept": [("Core nodes: exported LoRA + embedding", [str(i) for i in range(1, 11)])],
    "echodistill_sdxl_train_and_sample": [("1. SDXL models + photos", ["1", "2"]),
                                          ("2. Train (lite: 24 GB) + export", ["3", "9"]),
                                          ("3. Draw, watch, save", ["4", "5", "6", "7", "8"])],
    "core_nodes_sample_exported_sdxl_concept": [("Core nodes: exported SDXL LoRA + embedding",
                                                 [str(i) for i in range(1, 9)])],
}

ADD_GROUPS = """([groups]) => {
    const LG = window.LiteGraph ?? globalThis.LiteGraph;
    for (const [title, ids] of groups) {
        const nodes = ids.map((id) => app.graph.getNodeById(Number(id))).filter(Boolean);
        if (!nodes.length) continue;
        const group = new LG.LGraphGroup(title);
        let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
        for (const n of nodes) {
            x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - LG.NODE_TITLE_HEIGHT);
            x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
        }
        group.pos = [x0 - 10, y0 - 45];
        group.size = [x1 - x0 + 20, y1 - y0 + 55];
        app.graph.add(group);
    }
    app.graph.setDirtyCanvas(true, true);
}"""


# Seeds stay as written: a training seed that randomizes would retrain on every queue.
FIX_SEEDS_AND_ARRANGE = """async ([graph, name]) => {
    await app.loadApiJson(graph, name);
    for (const node of app.graph._nodes)
        for (const widget of node.widgets ?? [])
            if (widget.name === "control_after_generate") widget.value = "fixed";
    app.graph.arrange();
}"""


def on_sdxl(name: str) -> bool:
    return "sdxl" in name


def user_graph(graph: dict, name: str) -> dict:
    values = MINIWORLD_USER_VALUES if on_miniworld(graph) else SDXL_USER_VALUES if on_sdxl(name) else SD_USER_VALUES
    graph = json.loads(json.dumps(graph))
    for node in graph.values():
        for name, value in list(node["inputs"].items()):
            key = (node["class_type"], name)
            if key in values:
                node["inputs"][name] = values[key]
            elif isinstance(value, str):
                for old, new in TEXT_SWAPS.items():
                    node["inputs"][name] = node["inputs"][name].replace(old, new)
    return graph


def models_for(graph: dict) -> list[dict]:
    names = {v for n in graph.values() for v in n["inputs"].values() if isinstance(v, str)}
    return [m for m in MODEL_FILES if m["name"] in names]


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="echodistill-workflows-"))
    folders = {k: root / "models" / k for k in ("checkpoints", "loras", "embeddings", "clip_vision", "echodistill")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    server = comfy_support.ComfyServer(root, folders).start()
    try:
        with launch_page(server.url, width=1900, height=1000) as page:
            for source in sorted((REPO / "tests" / "api_graphs").glob("*.json")):
                graph = user_graph(json.loads(source.read_text()), source.stem)
                page.evaluate(FIX_SEEDS_AND_ARRANGE, [graph, source.stem])
                page.evaluate(ADD_GROUPS, [GROUPS.get(source.stem, [])])
                # JSON.stringify drops `undefined` fields; passed through as null they fail the schema.
                workflow = json.loads(page.evaluate("() => JSON.stringify(app.graph.serialize())"))
                workflow["models"] = models_for(graph)
                workflow.setdefault("extra", {})["echodistill"] = {"description": DESCRIPTIONS[source.stem]}
                atomic_write_text(REPO / "workflows" / source.name, json.dumps(workflow, indent=2) + "\n")
                if source.stem == "echodistill_train_and_sample":
                    page.evaluate("() => { app.canvas.ds.scale = 0.85; app.canvas.ds.offset = [90, 110]; "
                                  "app.canvas.setDirty(true, true); }")
                    page.wait_for_timeout(500)
                    (REPO / "docs").mkdir(exist_ok=True)
                    page.screenshot(path=str(REPO / "docs" / "workflow_train_and_sample.png"))
                print(f"wrote workflows/{source.name}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
