"""Test-wide guards: no network, one CPU thread, deterministic defaults."""

from __future__ import annotations

import contextlib
import ipaddress
import socket

import pytest
import torch

torch.set_num_threads(1)  # 2-core CI: a second thread makes every op slower, not faster

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


def _is_loopback(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = address[0]
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class NetworkAccessError(RuntimeError):
    """Raised when a test reaches for a non-loopback address."""


# Every refused attempt is recorded too, so a test can prove none happened even where a
# library would swallow the error and fall back silently.
_attempts: list[str] = []


def _refuse(what: str):
    _attempts.append(what)
    raise NetworkAccessError(f"test tried to reach {what}; tests must stay offline")


def _guarded_connect(self, address):
    if not _is_loopback(address):
        _refuse(repr(address))
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if not _is_loopback(address):
        _refuse(repr(address))
    return _real_connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if host not in (None, "localhost") and not _is_loopback((host,)):
        _refuse(repr(host))
    return _real_getaddrinfo(host, *args, **kwargs)


@pytest.fixture
def network_attempts():
    """The non-loopback connections refused during this test (empty when it stayed offline)."""
    _attempts.clear()
    return _attempts


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", _guarded_connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", _guarded_getaddrinfo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    yield


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """Tiny teacher/student families and their random models, built once per session."""
    from echodistill.models import tiny

    return tiny.build_tiny_pair(tmp_path_factory.mktemp("tiny_world"))


@pytest.fixture(scope="session")
def tiny_pair_folders(tiny_world):
    """The tiny teacher and student written as diffusers folders."""
    from echodistill.models import tiny as tiny_models

    root, fam, models = tiny_world["root"], tiny_world["families"], tiny_world["models"]
    teacher = tiny_models.write_diffusers_folder(models["teacher"], root / "teacher", fam["tiny-sd21"])
    student = tiny_models.write_diffusers_folder(models["student"], root / "student", fam["tiny-turbo"])
    return teacher, student


@pytest.fixture(scope="session")
def tiny_sdxl_world(tmp_path_factory):
    """Tiny SDXL teacher/student families (two text encoders, text_time UNets) and their random models."""
    from echodistill.models import tiny

    return tiny.build_tiny_sdxl_pair(tmp_path_factory.mktemp("tiny_sdxl_world"))


@pytest.fixture(scope="session")
def tiny_sdxl_folders(tiny_sdxl_world):
    """The tiny SDXL teacher and student written as diffusers folders."""
    from echodistill.models import tiny as tiny_models

    root, fam, models = tiny_sdxl_world["root"], tiny_sdxl_world["families"], tiny_sdxl_world["models"]
    teacher = tiny_models.write_diffusers_folder(models["teacher"], root / "teacher", fam["tiny-sdxl"])
    student = tiny_models.write_diffusers_folder(models["student"], root / "student", fam["tiny-sdxl-turbo"])
    return teacher, student


@pytest.fixture(scope="session")
def comfy_models(tmp_path_factory):
    """ComfyUI-style model folders shared by every real-ComfyUI test of the session."""
    root = tmp_path_factory.mktemp("comfy_models")
    folders = {kind: root / kind for kind in ("checkpoints", "loras", "embeddings", "clip_vision", "echodistill")}
    for folder in folders.values():
        folder.mkdir()
    return folders


@pytest.fixture(scope="session")
def mini_sd2(comfy_models, tmp_path_factory):
    """An SD-Turbo-layout checkpoint ComfyUI accepts (full-size text tower and VAE, 1.2 MB on disk)."""
    import comfy_support

    family = comfy_support.write_mini_sd2_family(tmp_path_factory.mktemp("mini_sd2") / "family")
    checkpoint = comfy_support.write_mini_sd2_checkpoint(comfy_models["checkpoints"] / "mini_turbo.ckpt", family)
    return {"checkpoint": checkpoint, "family": family}


@pytest.fixture(scope="session")
def comfy_server(comfy_models, tmp_path_factory):
    """A real ComfyUI 0.3.75 server (its own main.py) with this pack installed, started once."""
    import comfy_support

    server = comfy_support.ComfyServer(tmp_path_factory.mktemp("comfy_server"), comfy_models)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def prepared_server(comfy_server, comfy_models, tiny_pair_folders, tiny_world, mini_sd2, tiny_sdxl_world):
    """The live server with tiny models (SD 2.x-like diffusers folders, SDXL-like SGM single files in checkpoints/),
    the mini SD2 checkpoint's config, the tiny SDXL families' configs, and concept photos in place."""
    import shutil

    import comfy_support

    from PIL import Image

    from echodistill.models import tiny

    diffusers = comfy_models["echodistill"] / "diffusers"
    for name, folder in zip(("tiny-teacher", "tiny-student"), tiny_pair_folders):
        shutil.copytree(folder, diffusers / name, dirs_exist_ok=True)
    sd15 = tiny.build_models(tiny_world["families"]["tiny-sd15"], seed=3)
    tiny.write_diffusers_folder(sd15, diffusers / "tiny-sd15", tiny_world["families"]["tiny-sd15"])
    shutil.copytree(mini_sd2["family"], comfy_models["echodistill"] / "configs" / "mini-sd2", dirs_exist_ok=True)
    sdxl_families, sdxl_models = tiny_sdxl_world["families"], tiny_sdxl_world["models"]
    for role, family, name in (("teacher", "tiny-sdxl", "tiny_sdxl_base.safetensors"),
                               ("student", "tiny-sdxl-turbo", "tiny_sdxl_turbo.safetensors")):
        tiny.write_single_file(sdxl_models[role], comfy_models["checkpoints"] / name, sdxl_families[family], "sgm",
                               "sdxl", comfy_support.SDXL_HEADERS[role])
        shutil.copytree(sdxl_families[family], comfy_models["echodistill"] / "configs" / family, dirs_exist_ok=True)
    photos = comfy_server.base / "input" / "concept_photos"
    photos.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        picture = Image.new("RGB", (80, 72), (40 * i, 130, 200))
        picture.paste((230, 200, 40), (16 + 5 * i, 16, 44 + 5 * i, 48))
        picture.save(photos / f"mug{i}.png")
    (comfy_server.base / "input" / "empty_photos").mkdir(exist_ok=True)
    return comfy_server


@pytest.fixture
def cut_after_checkpoint(monkeypatch):
    """cut(name=None, saved=None): a context manager inside which the mini world's training loops die as a
    session's end kills them (KeyboardInterrupt) right after writing the checkpoint file `name` (None: the first
    one); every save happens for real, and `saved` collects the file names. The body must die, or the test fails.
    """
    from echodistill.miniworld import training

    real_save = training.save_atomically

    @contextlib.contextmanager
    def cut(name: str | None = None, saved: list | None = None):
        def save_then_die(path, payload):
            real_save(path, payload)
            if saved is not None:
                saved.append(path.name)
            if name is None or path.name == name:
                raise KeyboardInterrupt

        monkeypatch.setattr(training, "save_atomically", save_then_die)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            monkeypatch.setattr(training, "save_atomically", real_save)

    return cut
