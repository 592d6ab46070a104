"""A real ComfyUI 0.3.75 for tests: SD-Turbo- and SDXL-layout checkpoints it accepts, and a live server.

ComfyUI fixes the SD2 text tower (24 x 1024) and the VAE at full size, so the checkpoint is
full size in its tensors' shapes but tiny on disk: every tensor is an overlapping strided view
of one small random buffer (`.ckpt` keeps views; safetensors cannot). The UNet is the smallest
ComfyUI still reads as SD 2.x: one level of 320 channels, one res-block, a mid block.

The SDXL one likewise: both text towers (CLIP ViT-L 12 x 768, OpenCLIP ViT-bigG 32 x 1280) and the
VAE are fixed by ComfyUI's configs, and its SDXL detection (comfy/supported_models.py `SDXL`) keys on
the UNet's model channels (320), transformer depth per input res-block ([0, 0, 2, 2, 10, 10]), context
width (2048), linear projections and the size/pooled-text input width (2816), reading the rest from
the keys. So the smallest SDXL UNet it accepts keeps 320 channels at all three levels and those
depths, with one transformer layer per output block (a 188 M-parameter UNet instead of 2.6 B).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from echodistill.models import checkpoint_layout as layout_map
from echodistill.models.families import CONFIG_ROOT

REPO = Path(__file__).resolve().parents[1]
COMFYUI_DIR = REPO / ".cache" / "comfyui"
SDXL_HEADERS = {  # what Stability AI's SDXL files say in their modelspec header, for the tiny SDXL single files
    "teacher": {"modelspec.architecture": "stable-diffusion-xl-v1-base", "modelspec.title": "SDXL 1.0 base"},
    "student": {"modelspec.architecture": "stable-diffusion-xl-v1-base", "modelspec.title": "SDXL Turbo"},
}

MINI_SD2_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [320],
    "down_block_types": ["CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D"],
    "cross_attention_dim": 1024,
    "attention_head_dim": [5],
    "use_linear_projection": True,
    "upcast_attention": False,
}


MINI_SDXL_UNET = {
    **json.loads((CONFIG_ROOT / "sdxl-turbo" / "unet" / "config.json").read_text()),
    "sample_size": 8,
    "block_out_channels": [320, 320, 320],
    "attention_head_dim": [5, 5, 5],  # 64-wide heads, as ComfyUI builds SDXL's attention
    "reverse_transformer_layers_per_block": [[1, 1, 1], [1, 1, 1], [0, 0, 0]],
}


def require_comfyui() -> Path:
    if not (COMFYUI_DIR / "main.py").is_file():
        raise RuntimeError(f"ComfyUI is not at {COMFYUI_DIR}: run scripts/bootstrap test (it fetches ComfyUI 0.3.75)")
    return COMFYUI_DIR


def write_mini_sd2_family(folder: Path) -> Path:
    """Our config folder for the mini checkpoint: SD-Turbo's configs with the one-level UNet."""
    shutil.copytree(CONFIG_ROOT / "sd-turbo", folder)
    (folder / "unet" / "config.json").write_text(json.dumps(MINI_SD2_UNET))
    return folder


def _strided_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Full-size tensors that are all views of two small buffers (random weights, ~1 norms)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(1 << 18, generator=generator) * 0.02
    ones = 1.0 + torch.randn(1 << 12, generator=generator) * 0.02
    state = {}
    for index, (key, shape) in enumerate(shapes.items()):
        is_norm = len(shape) == 1 and key.endswith(".weight") and ("norm" in key or "ln_" in key)
        source = ones if is_norm else noise
        strides = [(1, 3, 5, 7)[len(shape) - 1 - d] for d in range(len(shape))]  # last dim 1, then 3, 5, 7
        span = sum((size - 1) * stride for size, stride in zip(shape, strides)) + 1
        offset = (index * 131) % max(1, source.numel() - span)
        if span > source.numel():
            raise ValueError(f"{key} {shape} does not fit the buffer")
        state[key] = source.as_strided(shape, strides, offset)
    return state


def write_mini_sd2_checkpoint(path: Path, family: Path, seed: int = 0) -> Path:
    """An SGM-layout (SD-Turbo-style) .ckpt that ComfyUI and our loader both read."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((family / "unet" / "config.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((family / "vae" / "config.json").read_text()))
        text_config = json.loads((family / "text_encoder" / "config.json").read_text())
        text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in text_config.items() if not k.startswith("_")}))
    shapes: dict[str, tuple[int, ...]] = {}
    unet_sources = layout_map.unet_sources(unet.state_dict(), MINI_SD2_UNET)
    vae_sources = layout_map.vae_sources(vae.state_dict(), json.loads((family / "vae" / "config.json").read_text()))
    text_keys = [k for k in text.state_dict() if not k.endswith("position_ids")]
    text_sources = layout_map.text_sources(text_keys, "sgm", "openclip")
    for sources, module in ((unet_sources, unet), (vae_sources, vae)):
        meta = module.state_dict()
        for name, source in sources.items():
            shape = tuple(meta[name].shape)
            shapes[source.key] = shape if not (source.conv1x1 and len(shape) == 2) else (*shape, 1, 1)
    meta = {k.removeprefix("text_model."): v for k, v in text.state_dict().items()}
    prefix = layout_map.TEXT_PREFIXES[("sgm", "openclip")]
    width = text_config["hidden_size"]
    for name, source in text_sources.items():
        shape = tuple(meta[name.removeprefix("text_model.")].shape)
        shapes[source.key] = (3 * shape[0], *shape[1:]) if source.chunk else shape
    for key in [k for k in shapes if ".resblocks.22." in k]:  # the 24th layer diffusers drops
        shapes[key.replace(".resblocks.22.", ".resblocks.23.")] = shapes[key]
    shapes[f"{prefix}text_projection"] = (width, width)
    state = _strided_state(shapes, seed)
    state[f"{prefix}logit_scale"] = torch.tensor(4.6052)
    torch.save({"state_dict": state}, path)
    return path


def write_mini_sdxl_family(folder: Path) -> Path:
    """Our config folder for the mini SDXL checkpoint: SDXL-Turbo's configs with the small UNet."""
    shutil.copytree(CONFIG_ROOT / "sdxl-turbo", folder)
    (folder / "unet" / "config.json").write_text(json.dumps(MINI_SDXL_UNET))
    return folder


def write_mini_sdxl_checkpoint(path: Path, family: Path, seed: int = 0) -> Path:
    """An SGM-layout SDXL .ckpt (Stability AI's key names, from checkpoint_layout's tables) that ComfyUI's
    CheckpointLoaderSimple loads as SDXL and our loader reads with `family`."""
    config = json.loads((family / "unet" / "config.json").read_text())
    vae_config = json.loads((family / "vae" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        vae = AutoencoderKL.from_config(vae_config)
        towers = {}
        for component, model_class in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            text = json.loads((family / component / "config.json").read_text())
            towers[component] = model_class(CLIPTextConfig(**{k: v for k, v in text.items() if not k.startswith("_")}))
    shapes: dict[str, tuple[int, ...]] = {}
    groups = [(layout_map.unet_sources(unet.state_dict(), config), unet.state_dict()),
              (layout_map.vae_sources(vae.state_dict(), vae_config), vae.state_dict())]
    for component, tower in towers.items():
        meta = {k.removeprefix("text_model."): v for k, v in tower.state_dict().items() if not k.endswith("position_ids")}
        groups.append((layout_map.text_sources(meta, "sgm", "sdxl", component), meta))
    for sources, meta in groups:
        for name, source in sources.items():
            shape = tuple(meta[name].shape)
            if source.chunk:  # fused q/k/v
                shape = (source.chunk[1] * shape[0], *shape[1:])
            elif source.transpose:
                shape = shape[::-1]
            elif source.conv1x1 and len(shape) == 2:
                shape = (*shape, 1, 1)
            shapes[source.key] = shape
    state = _strided_state(shapes, seed)
    _, prefix = layout_map.SDXL_TEXT_TOWERS["text_encoder_2"]
    state[f"{prefix}logit_scale"] = torch.tensor(4.6052)
    torch.save({"state_dict": state}, path)
    return path


# --- a live server ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ComfyServer:
    """ComfyUI's own main.py in a subprocess, with our pack in its custom_nodes."""

    def __init__(self, root: Path, model_dirs: dict[str, Path]):
        self.root = root
        self.base = root / "base"
        (self.base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        (self.base / "user" / "default").mkdir(parents=True, exist_ok=True)
        # The example workflows name the real SD 2.1 / SD-Turbo files, absent here: the missing-models
        # dialog that would (rightly) offer their downloads is off, so any other dialog stands out.
        settings = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False}
        (self.base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(settings))
        packs = root / "packs"
        packs.mkdir(exist_ok=True)
        link = packs / "comfyui-echodistill"
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        lines = ["echodistill_tests:", f"  base_path: {root}"]
        lines += [f"  {kind}: {path}" for kind, path in model_dirs.items()]
        lines.append(f"  custom_nodes: {packs}")
        (root / "paths.yaml").write_text("\n".join(lines) + "\n")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "ComfyServer":
        comfy = require_comfyui()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--base-directory", str(self.base), "--extra-model-paths-config", str(self.root / "paths.yaml"),
                   "--disable-api-nodes", "--disable-auto-launch"]
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=comfy, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited during start-up:\n{self.log_text()[-3000:]}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer within {timeout} s:\n{self.log_text()[-3000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if getattr(self, "log", None):
            self.log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, route: str):
        with urllib.request.urlopen(self.url + route, timeout=30) as response:
            body = response.read()
            return json.loads(body) if response.headers.get_content_type() == "application/json" else body

    def post(self, route: str, payload: dict):
        request = urllib.request.Request(self.url + route, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue an API-format prompt and wait for its history entry."""
        status, answer = self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        if status != 200:
            raise AssertionError(f"ComfyUI refused the prompt ({status}): {answer}")
        return self.wait(answer["prompt_id"], timeout)

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """The history entry of a queued prompt, once it has finished."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log_text()[-3000:]}")
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log_text()[-3000:]}")

    def image(self, entry: dict) -> bytes:
        info = entry["images"][0]
        query = f"/view?filename={info['filename']}&subfolder={info['subfolder']}&type={info['type']}"
        return self.get(query)

    def run_watching(self, prompt: dict, *, interrupt_when=None, timeout: float = 600) -> tuple[str, list, list]:
        """Queue a prompt while listening on /ws; returns (prompt_id, JSON messages, binary event types).

        `interrupt_when(message)` returning True posts /interrupt (once).
        """
        import asyncio
        import struct

        import aiohttp

        client_id = uuid.uuid4().hex

        async def watch():
            messages, binary = [], []
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"{self.url}/ws?clientId={client_id}") as socket_:
                    async with session.post(f"{self.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                        answer = await r.json()
                        if r.status != 200:
                            raise AssertionError(f"ComfyUI refused the prompt ({r.status}): {answer}")
                    prompt_id, interrupted = answer["prompt_id"], False
                    async with asyncio.timeout(timeout):
                        async for frame in socket_:
                            if frame.type == aiohttp.WSMsgType.BINARY:
                                binary.append(struct.unpack(">I", frame.data[:4])[0])
                                continue
                            message = json.loads(frame.data)
                            data = message.get("data", {})
                            if data.get("prompt_id") not in (None, prompt_id):
                                continue
                            messages.append(message)
                            if interrupt_when and not interrupted and interrupt_when(message):
                                interrupted = True
                                async with session.post(f"{self.url}/interrupt", json={}) as r:
                                    assert r.status == 200
                            if message["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                                break
                            if message["type"] == "executing" and data.get("node") is None:
                                break
            return prompt_id, messages, binary

        return asyncio.run(watch())


def lora_graph(checkpoint: str, lora_name: str, prompt: str, seed: int, prefix: str, *, strength: float = 1.0,
               steps: int = 1, ksampler: str | None = None) -> dict:
    """A core-nodes API graph: checkpoint -> LoraLoader -> CLIPTextEncode(prompt) and "" -> SDTurboScheduler +
    euler in SamplerCustom at cfg 1 (or, with `ksampler`, a plain KSampler with that scheduler and euler) on a
    64x64 empty latent; saves the image under `prefix` and the latent under latents/`prefix`."""
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name,
                                                    "strength_model": strength, "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": prompt}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ""}},
        "5": {"class_type": "SDTurboScheduler", "inputs": {"model": ["2", 0], "steps": steps, "denoise": 1.0}},
        "6": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "SamplerCustom", "inputs": {
            "model": ["2", 0], "add_noise": True, "noise_seed": seed, "cfg": 1.0, "positive": ["3", 0],
            "negative": ["4", 0], "sampler": ["6", 0], "sigmas": ["5", 0], "latent_image": ["7", 0]}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": prefix}},
        "11": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": f"latents/{prefix}"}},
    }
    if ksampler is not None:
        for node in ("5", "6"):
            del graph[node]
        graph["8"] = {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": ksampler,
            "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["7", 0], "denoise": 1.0}}
    return graph
