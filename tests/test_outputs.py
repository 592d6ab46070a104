"""Files the pack writes: one name rule, distinct export names, open()'s permissions, no stale temp files."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from echodistill import files
from echodistill.cli import main
from echodistill.concepts.bundle import ConceptBundle
from echodistill.concepts.export import export_concept
from echodistill.errors import ConfigError
from echodistill.imaging import save_png
from echodistill.models.adapters import adapter_state_dict, add_custom_diffusion
from echodistill.models.pair import load_model_pair
from echodistill.training.checkpointing import TrainingCheckpoint

COMFYUI = os.path.join(os.path.dirname(__file__), "..", ".cache", "comfyui")


@pytest.fixture(scope="module")
def bundle(tiny_pair_folders) -> ConceptBundle:
    pair = load_model_pair(*tiny_pair_folders)
    generator = torch.Generator().manual_seed(0)
    states = {}
    for part in ("student", "teacher"):
        add_custom_diffusion(getattr(pair, part).unet)
        states[part] = {k: torch.randn(v.shape, generator=generator) * 0.05
                        for k, v in adapter_state_dict(getattr(pair, part).unet).items()}
    return ConceptBundle(token="<v*>", initializer="dog", class_word="dog",
                         embedding=torch.randn(pair.text_encoder.config.hidden_size, generator=generator),
                         adapter="custom_diffusion", student_adapter=states["student"],
                         teacher_adapter=states["teacher"], fingerprints=pair.fingerprints(),
                         families={"teacher": "teacher", "student": "student"}, step=3)


def test_export_without_embedding_folder_writes_two_distinct_files(bundle, tmp_path, capsys):
    concept = bundle.save(tmp_path / "b.safetensors")
    out = tmp_path / "d"
    assert main(["export", "--concept", str(concept), "--out", str(out)]) == 0
    with safe_open(str(out / "b.safetensors"), "pt") as lora:
        assert all(k.startswith("lora_unet_") for k in lora.keys())
    with safe_open(str(out / "b_embedding.safetensors"), "pt") as embedding:
        assert list(embedding.keys()) == [bundle.token]  # one (1, D) tensor keyed by the token
    assert "prompt with 'embedding:b_embedding'" in capsys.readouterr().out
    # Separate folders: both keep the plain name.
    assert main(["export", "--concept", str(concept), "--out", str(tmp_path / "loras"),
                 "--embedding-out", str(tmp_path / "embeddings")]) == 0
    assert (tmp_path / "loras" / "b.safetensors").is_file() and (tmp_path / "embeddings" / "b.safetensors").is_file()

    # A clash with an existing file is refused before anything is written: the LoRA is not rewritten.
    (out / "b_embedding.safetensors").unlink()
    before = (out / "b.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["export", "--concept", str(concept), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "already exist" in err
    assert (out / "b.safetensors").stat().st_mtime_ns == before and not (out / "b_embedding.safetensors").exists()


@pytest.mark.parametrize("name, suggestion", [("../../x", "x"), ("/tmp/abs", "abs"), ("my mug", "my_mug"),
                                              ("mug(v2)", "mug_v2"), ("mug:1.2", "mug_1.2"), ("a,b", "a_b")])
def test_every_writer_refuses_names_outside_the_rule_with_a_suggestion(bundle, tmp_path, capsys, name, suggestion):
    concept = bundle.save(tmp_path / "b.safetensors")
    assert main(["export", "--concept", str(concept), "--out", str(tmp_path / "d"), "--name", name]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: name {name!r} cannot be used") and f"try {suggestion!r}" in err
    assert not (tmp_path / "d").exists() and not (tmp_path / "x.safetensors").exists()
    with pytest.raises(ConfigError, match=f"try '{suggestion}'"):
        export_concept(bundle, name, tmp_path / "loras", tmp_path / "embeddings")
    files.check_name(suggestion)  # the suggestion itself passes


def test_accepted_names_round_trip_through_comfyui_prompt_parsing(tmp_path):
    """ComfyUI's own SDTokenizer resolves `embedding:NAME` (plain, weighted, followed by a comma) to NAME's file for
    every accepted name; every refused name fails in one of these forms (resolves another file, or breaks the parser)."""
    if not os.path.isfile(os.path.join(COMFYUI, "comfy", "sd1_clip.py")):
        pytest.skip("ComfyUI is not in .cache/comfyui (scripts/bootstrap fetches it)")
    accepted = ["mug", "my_mug", "mug-v2", "Mug.2", "a1"]
    refused = ["my mug", "mug(v2)", "mug:1", "mug,", "(mug)"]  # "\\", "/" and ".." are refused as paths
    for name in accepted:
        assert files.check_name(name) == name
    for name in refused:
        with pytest.raises(ConfigError, match="cannot be used"):
            files.check_name(name)
    script = f"""
import json, os, sys, torch, safetensors.torch
sys.argv = ["x", "--cpu"]; sys.path.insert(0, {os.path.abspath(COMFYUI)!r})
import comfy.options; comfy.options.enable_args_parsing()
from comfy.sd1_clip import SDTokenizer
found = {{}}
for index, name in enumerate({accepted + refused!r}):
    folder = os.path.join({str(tmp_path)!r}, str(index))
    os.makedirs(folder)
    for decoy in ("mug", "my"):  # what a broken parse would pick up instead
        safetensors.torch.save_file({{"emb_params": torch.zeros(1, 768)}}, os.path.join(folder, decoy + ".safetensors"))
    safetensors.torch.save_file({{"emb_params": torch.full((1, 768), 7.0)}}, os.path.join(folder, name + ".safetensors"))
    tokenizer = SDTokenizer(embedding_directory=folder)
    found[name] = []
    for prompt in ("a photo of embedding:" + name + " dog", "a photo of (embedding:" + name + ":1.2) dog",
                   "a photo of (embedding:" + name + ") dog", "embedding:" + name + ", a dog"):
        try:
            tokens = tokenizer.tokenize_with_weights(prompt)
        except Exception:  # ComfyUI itself fails on some (e.g. "(mug)")
            found[name].append(False)
            continue
        found[name].append(any(torch.is_tensor(t) and bool((t == 7.0).all()) for batch in tokens for t, *_ in batch))
print(json.dumps(found))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    found = __import__("json").loads(result.stdout.strip().splitlines()[-1])
    assert {n: found[n] for n in accepted} == {n: [True] * 4 for n in accepted}
    assert {n: all(found[n]) for n in refused} == {n: False for n in refused}


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_written_files_get_the_mode_open_would_give(bundle, tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        written = [
            bundle.save(tmp_path / "bundle.safetensors"),
            save_png(Image.new("RGB", (4, 4)), tmp_path / "picture.png"),
            files.atomic_write_text(tmp_path / "scores.json", "{}"),
            TrainingCheckpoint(step=1, config={}, weights={}, optimizers={}, rng={}, echo={},
                               fingerprints={}).save(tmp_path / "checkpoint.pt"),
        ]
        _, targets = export_concept(bundle, "mug", tmp_path / "loras", tmp_path / "embeddings")
        written += [targets.lora, targets.embedding]
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == mode
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {p.name: oct(mode) for p in written}


@pytest.mark.parametrize("old_mode", [0o600, 0o640, 0o664])
def test_a_replaced_file_keeps_its_mode_as_open_would(tmp_path, old_mode):
    # open(path, "w") on an existing file keeps its mode: a user who made a report private keeps it private
    target, plain = tmp_path / "scores.json", tmp_path / "plain.json"
    for path in (target, plain):
        path.write_text("old")
        os.chmod(path, old_mode)
    previous = os.umask(0o022)
    try:
        files.atomic_write_text(target, "new")
        with open(plain, "w") as handle:
            handle.write("new")
    finally:
        os.umask(previous)
    assert target.read_text() == "new"
    assert oct(stat.S_IMODE(target.stat().st_mode)) == oct(stat.S_IMODE(plain.stat().st_mode)) == oct(old_mode)


def test_a_read_only_file_is_replaced_without_making_its_temp_file_unwritable(tmp_path):
    # the old mode (0444) is given once the bytes are in: a user who is not root could not write the temp file
    target = tmp_path / "report.json"
    target.write_text("old")
    os.chmod(target, 0o444)
    modes_while_writing = []

    def write(temporary):
        modes_while_writing.append(stat.S_IMODE(temporary.stat().st_mode))
        temporary.write_text("new")

    files.atomic_write(target, write)
    assert modes_while_writing[0] & stat.S_IWUSR  # writable by its owner while written
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o444


def test_a_write_to_a_symbolic_link_goes_through_it_as_open_would(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "scores.json").write_text("old")
    os.chmod(shared / "scores.json", 0o640)
    link = tmp_path / "scores.json"
    link.symlink_to(shared / "scores.json")
    files.atomic_write_text(link, "new")
    assert link.is_symlink() and (shared / "scores.json").read_text() == "new"
    assert stat.S_IMODE((shared / "scores.json").stat().st_mode) == 0o640
    assert sorted(p.name for p in shared.iterdir()) == ["scores.json"]  # no temp file left beside the target
    dangling = tmp_path / "new.json"
    dangling.symlink_to(shared / "new.json")  # open() creates a missing target
    files.atomic_write_text(dangling, "made")
    assert dangling.is_symlink() and (shared / "new.json").read_text() == "made"


def test_os_errors_name_the_permission_that_is_missing():
    denied = PermissionError(errno.EACCES, "Permission denied", "x")
    assert files.describe_os_error(denied, "write").startswith("no permission to write there")
    assert files.describe_os_error(denied, "read").startswith("no permission to read there")
    assert "write" not in files.describe_os_error(denied)  # a read refused is not called a write
    assert files.describe_os_error(OSError(errno.EROFS, "Read-only file system")) == "the file system is read-only"
    assert files.describe_os_error(OSError(errno.ENOSPC, "No space")) == "no space left on the device"
    assert str(files.write_error("a/b.json", denied)).startswith("cannot write a/b.json: no permission to write")


@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_written_models_oracle_and_adapter_get_the_modes_open_and_mkdir_would_give(tmp_path, umask, file_mode,
                                                                                 folder_mode):
    # mkdtemp makes 0700 folders and safetensors' writer (diffusers' save_pretrained) 0600 files
    from echodistill.miniworld import architecture as arch
    from echodistill.miniworld.image_prompt import ImagePromptAdapter
    from echodistill.miniworld.oracle import AttributeReader, Oracle, SubjectEncoder
    from echodistill.models import tiny

    torch.manual_seed(0)
    unet, text_encoder, vae = arch.build_unet(), arch.build_text_encoder(), arch.build_vae()
    previous = os.umask(umask)
    try:
        arch.write_model_folder(tmp_path / "models" / "teacher", "teacher", unet, text_encoder, vae)
        Oracle(AttributeReader(width=8, hidden=16), SubjectEncoder(width=8, dim=16)).save(tmp_path / "oracle")
        ImagePromptAdapter.for_unet(unet, tokens=2, width=8).save(tmp_path / "oracle" / "image_prompt.safetensors")
        family = tiny.write_family(tmp_path / "families", "tiny-sd21")
        models = tiny.build_models(family, seed=0)
        tiny.write_diffusers_folder(models, tmp_path / "tiny", family)
        tiny.write_single_file(models, tmp_path / "tiny.safetensors", family, "sgm", "openclip")
    finally:
        os.umask(previous)
    written = [tmp_path / "models" / "teacher", tmp_path / "oracle", tmp_path / "tiny", tmp_path / "tiny.safetensors"]
    paths = [p for root in written for p in [root, *root.rglob("*")]]
    assert any(p.name == "diffusion_pytorch_model.safetensors" for p in paths)
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in paths}
    expected = {str(p.relative_to(tmp_path)): oct(folder_mode if p.is_dir() else file_mode) for p in paths}
    assert modes == expected


def test_stale_temp_files_of_ours_are_removed_at_the_next_write(tmp_path):
    old = time.time() - 3600
    stale = tmp_path / ".checkpoint.pt.k2j4_x9a.tmp"  # what a write killed an hour ago leaves
    foreign = tmp_path / ".notes.tmp"  # not our pattern
    stale.write_bytes(b"half a checkpoint")
    foreign.write_bytes(b"someone else's")
    for path in (stale, foreign):
        os.utime(path, (old, old))
    fresh = tmp_path / ".concept.safetensors.ab12cd34.tmp"  # a write of this process, in flight
    fresh.write_bytes(b"in flight")
    files.atomic_write_text(tmp_path / "scores.json", "{}")
    assert not stale.exists() and foreign.exists() and fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".concept.safetensors.ab12cd34.tmp", ".notes.tmp",
                                                          "scores.json"]


def test_a_released_output_lock_leaves_no_file_behind_and_is_taken_again(tmp_path):
    from echodistill.files import exclusive_output

    target, lock = tmp_path / "concept.safetensors", tmp_path / ".concept.safetensors.lock"
    with exclusive_output(target):
        with exclusive_output(target):  # re-entrant within the process
            assert lock.is_file()
        assert lock.is_file()  # the outer hold keeps it
    assert list(tmp_path.iterdir()) == []  # no ".concept.safetensors.lock" beside a finished output
    with exclusive_output(target):
        assert lock.is_file()
    assert list(tmp_path.iterdir()) == []


def test_a_failed_job_removes_only_the_empty_folders_it_made(tmp_path):
    from echodistill.files import check_writable, exclusive_output, removing_new_folders_on_error

    (tmp_path / "had").mkdir()
    with pytest.raises(RuntimeError):
        with removing_new_folders_on_error():
            check_writable(tmp_path / "new" / "deep" / "out")
            check_writable(tmp_path / "had")
            check_writable(tmp_path / "wrote")
            (tmp_path / "wrote" / "image.png").write_bytes(b"png")  # something the job made stays
            with exclusive_output(tmp_path / "locked"):  # a run folder: its released lock is no content
                check_writable(tmp_path / "locked")
            with exclusive_output(tmp_path / "file_out" / "concept.safetensors"):  # an output file's lock neither
                pass
            raise RuntimeError("refused")
    assert not (tmp_path / "new").exists() and not (tmp_path / "locked").exists()
    assert not (tmp_path / "file_out").exists()
    assert (tmp_path / "had").is_dir() and (tmp_path / "wrote" / "image.png").is_file()
    with removing_new_folders_on_error():  # success: everything stays
        check_writable(tmp_path / "ok" / "out")
    assert (tmp_path / "ok" / "out").is_dir()


def test_a_full_disk_while_a_mini_world_checkpoint_is_saved_is_named_and_keeps_the_previous_one(tmp_path,
                                                                                             monkeypatch):
    from echodistill.errors import OutputWriteError
    from echodistill.miniworld.training import save_atomically

    path = tmp_path / "ckpt" / "teacher_running.pt"
    save_atomically(path, {"step": 1, "weights": torch.ones(3)})

    def full(temporary, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "_write_bytes", full)
    with pytest.raises(OutputWriteError, match="teacher_running.pt: no space left on the device"):
        save_atomically(path, {"step": 2, "weights": torch.zeros(3)})
    assert torch.load(path, weights_only=True)["step"] == 1  # the previous checkpoint is intact
    assert [p.name for p in path.parent.iterdir()] == ["teacher_running.pt"]  # no temp file left
