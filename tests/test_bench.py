"""`echodistill bench sample|train` on the tiny pair: JSON shape, self-consistent numbers, printed table.

Nothing here asserts on speed: the values are only checked to be measured (positive) and the
derived numbers (ratios, throughput, projections) to come from the same measurements.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from echodistill.benchmarks import measuring as benchmarking
from echodistill.benchmarks import speed as bench
from echodistill.cli import main

MEASURED_KEYS = {"memory", "flops", "tflops_per_s", "utilisation_pct"}


def _check_measured(case: dict, per_call: str, count: int) -> None:
    assert MEASURED_KEYS | {per_call} <= set(case)
    times = case[per_call]
    assert len(times["all"]) == count and all(t > 0 for t in times["all"])
    assert 0 < times["p50"] <= times["p95"] <= max(times["all"])
    assert case["flops"] > 0 and case["tflops_per_s"] > 0
    assert set(case["memory"]) == {"peak_mb", "growth_mb"}
    assert case["utilisation_pct"] is None  # no CPU has a peak in the table


@pytest.mark.parametrize("command", [
    ["sample", "--model", "sdxl", "--size", "100"], ["sample", "--model", "sdxl", "--size", "0"],
    ["train", "--model", "sdxl", "--resolution", "100"], ["memory", "--teacher-resolutions", "512", "100"],
    ["memory", "--out", "."], ["sample", "--model", "tiny", "--device", "bogus"],
    ["sample", "--model", "sdxl", "--size", "5_12"]])
def test_bench_sizes_and_outputs_are_refused_before_anything_is_built(command, capsys):
    # argparse refuses them while parsing (exit 2), so no model can have been built; the device before building
    try:  # argparse exits for a bad argument; main returns 2 for an error found after parsing
        code = main(["bench", *command])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert any(reason in err for reason in ("must be a positive multiple of 64", "is a folder", "is not a device",
                                            "'5_12' is not a whole number of pixels")), err


def test_bench_sample_tiny_writes_json_and_prints_table(tmp_path, capsys):
    out = tmp_path / "sample.json"
    argv = ["bench", "sample", "--model", "tiny", "--device", "cpu", "--size", "64", "--batch", "1", "2",
            "--repeats", "2", "--warmup", "1", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert {"benchmark", "settings", "device", "notes", "results"} <= set(report)
    assert report["settings"] | {} == {**report["settings"], "model": "tiny", "size": 64, "batches": [1, 2],
                                       "repeats": 2, "warmup": 1, "dtype": "fp32"}
    assert {"name", "peak_tflops", "memory_method", "torch_threads"} <= set(report["device"])
    assert [row["batch"] for row in report["results"]] == [1, 2]
    for row in report["results"]:
        ours, peer = row["echodistill"], row["diffusers"]
        for case in (ours, peer):
            _check_measured(case, "latency_ms", 2)
            assert case["images_per_s"] == pytest.approx(row["batch"] / (case["latency_ms"]["p50"] / 1e3))
        ratios = row["ratios"]
        assert ratios["latency_ms_p50"] == pytest.approx(ours["latency_ms"]["p50"] / peer["latency_ms"]["p50"])
        assert ratios["latency_ms_p95"] == pytest.approx(ours["latency_ms"]["p95"] / peer["latency_ms"]["p95"])
        assert ratios["images_per_s"] == pytest.approx(ours["images_per_s"] / peer["images_per_s"])
        assert ratios["flops"] == pytest.approx(ours["flops"] / peer["flops"])
    printed = capsys.readouterr().out
    assert report["device"]["name"] in printed
    for word in ("p50 ms", "echodistill", "diffusers", "ours/peer", f"wrote {out}"):
        assert word in printed


def test_bench_train_tiny_writes_json_and_prints_table(tmp_path, capsys):
    out = tmp_path / "train.json"
    argv = ["bench", "train", "--model", "tiny", "--device", "cpu", "--resolution", "64", "--steps", "2",
            "--warmup", "0", "--presets", "paper", "lite", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["presets"] == ["paper", "lite"] and report["settings"]["steps"] == 2
    for row, name in zip(report["results"], ("paper", "lite")):
        assert row["preset"] == name
        ours, peer = row["echodistill"], row["custom_diffusion"]
        _check_measured(ours, "seconds_per_iter_s", 2)
        _check_measured(peer, "seconds_per_iter_s", 2)
        overhead = row["overhead"]
        assert overhead["seconds_per_iter_s_p50"] == pytest.approx(
            ours["seconds_per_iter_s"]["p50"] / peer["seconds_per_iter_s"]["p50"]
        )
        assert overhead["flops"] == pytest.approx(ours["flops"] / peer["flops"])
        for impl, case in (("echodistill", ours), ("custom_diffusion", peer)):
            assert row["projected_1000_iters_s"][impl] == pytest.approx(case["seconds_per_iter_s"]["p50"] * 1000)
    assert report["results"][1]["config"]["batch_size"] == 1  # lite
    printed = capsys.readouterr().out
    for word in ("s/it p50", "custom_diffusion", "overhead", "(projected)", report["device"]["name"]):
        assert word in printed


def test_cpu_attention_flops_are_counted_like_cuda_attention():
    query, key, value = torch.randn(2, 3, 16, 8), torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    flops = bench.count_flops(lambda: F.scaled_dot_product_attention(query, key, value))
    assert flops == 2 * (2 * 2 * 3 * 16 * 10 * 8)  # QK^T and PV, 2 FLOPs per multiply-add


def test_peak_table_prefers_the_specific_name():
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("NVIDIA GH200 480GB") == 989.0
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops("CPU AMD EPYC (2 torch threads)") is None


def test_sd_pair_builds_the_real_architectures_without_memory():
    pair = bench.build_pair("sd", "meta", "fp32")
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(pair.student.unet) == count(pair.teacher.unet) == 865_910_724  # SD 2.1 UNet
    assert count(pair.text_encoder) == 340_387_840 and count(pair.vae) == 83_653_863
    assert (pair.teacher.family, pair.student.family) == ("sd21-base", "sd-turbo")
    assert pair.tokenizer.pad_token == "!"
    assert not any(p.requires_grad for p in pair.student.unet.parameters())
    shared = bench.build_pair("sd", "meta", "bf16", with_teacher=False)
    assert shared.teacher.unet is shared.student.unet and shared.dtype == torch.bfloat16


def test_cpu_memory_is_null_without_psutil(monkeypatch):
    monkeypatch.setattr(benchmarking, "psutil", None)
    with bench.MemoryProbe(torch.device("cpu")) as probe:
        torch.ones(1000).sum()
    assert probe.summary() == {"peak_mb": None, "growth_mb": None}
    assert bench.MemoryProbe.method(torch.device("cpu")) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_is_refused_where_there_is_none(capsys):
    with pytest.raises(bench.BenchError, match="CUDA is not available here: pass --device cpu"):
        bench.check_device("cuda")
    assert main(["bench", "sample", "--model", "tiny", "--device", "cuda", "--out", "unused.json"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_bad_settings_are_refused():
    with pytest.raises(bench.BenchError, match="unknown model 'xl'; valid: tiny, sd"):
        bench.build_pair("xl", "cpu", "fp32")
    with pytest.raises(bench.BenchError, match=r"presets \['fast'\] \(valid: paper, balanced, lite\)"):
        bench.bench_train("tiny", "cpu", presets=("fast",))


def test_bench_sample_passes_the_speed_options_and_records_them(tmp_path, capsys):
    out = tmp_path / "sample.json"
    argv = ["bench", "sample", "--model", "tiny", "--device", "cpu", "--size", "64", "--batch", "1", "--repeats", "1",
            "--warmup", "0", "--channels-last", "--fuse-qkv", "--no-prompt-cache", "--out", str(out)]
    assert main(argv) == 0
    options = json.loads(out.read_text())["settings"]["options"]
    assert options | {} == {**options, "channels_last": True, "fuse_qkv": True, "cache_prompts": False,
                            "cuda_graph": False, "compile": False}
    assert "echodistill options: channels_last, fuse_qkv" in capsys.readouterr().out
    assert main([*argv[:-2], "--cuda-graph", "--out", str(tmp_path / "graph.json")]) != 0
    assert "--cuda-graph needs the models on a CUDA device; they are on cpu" in capsys.readouterr().err


# --- SDXL, and counting on the meta device ---------------------------------------------------------

def test_sdxl_pair_builds_the_real_architectures_without_memory():
    pair = bench.build_pair("sdxl", "meta", "bf16")
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(pair.student.unet) == count(pair.teacher.unet) == 2_567_463_684  # SDXL UNet
    assert count(pair.text_encoder) == 123_060_480 and count(pair.text_encoder_2) == 694_659_840  # CLIP-L, bigG
    assert count(pair.vae) == 83_653_863 and pair.is_sdxl and pair.dtype == torch.bfloat16
    assert (pair.teacher.family, pair.student.family) == ("sdxl-base", "sdxl-turbo")
    assert (pair.tokenizer.pad_token, pair.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    assert pair.text_encoder_2.config.eos_token_id == 49407  # pooled at the real end token, as load_model_pair sets
    assert pair.student.unet.device.type == "meta"


def _real_cpu_counts(preset_name: str) -> tuple[int, int, int]:
    """(sampling FLOPs per image, training FLOPs per iteration, training peak tensor bytes) of the tiny pair on the
    CPU, the same code paths as meta_run's, tracked by the same tensor-bytes tracker."""
    from echodistill.benchmarks.meta_run import MetaExecution, _pair_tensors
    from echodistill.sampling.samplers import sample_student
    from echodistill.sampling.speed import SamplerOptions
    from echodistill.training.config import preset
    from echodistill.training.trainer import Trainer

    pair = bench.build_pair("tiny", "cpu", "fp32")
    sample_flops = benchmarking.count_flops(lambda: sample_student(
        pair, ["a photo of a dog, picture 0"], seeds=[0], width=64, height=64, return_latents=False,
        options=SamplerOptions(cache_prompts=False)))
    config = preset(preset_name, resolution=64, class_word="toy").with_changes(mixed_precision="no", offload=False)
    with MetaExecution(_pair_tensors(pair)) as tracker:
        trainer = Trainer(pair, bench.synthetic_concept_images(4, 64), config)
        trainer.train_step()
        tracker.reset_peak()
        train_flops = benchmarking.count_flops(trainer.train_step)
    return sample_flops, train_flops, tracker.peak


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_meta_device_counts_agree_with_a_real_cpu_run():
    """FLOPs within 2% (the CPU's flash-attention backward recomputes the attention matrix; meta's math path does
    not), peak tensor bytes within 5%, for sampling and for training with and without gradient checkpointing."""
    from echodistill.benchmarks.meta_run import sample_cost, train_cost

    for name in ("paper", "balanced"):
        real_sample, real_train, real_peak = _real_cpu_counts(name)
        meta = train_cost("tiny", name, 64, mixed_precision="no")
        assert meta["weights_dtype"] == ("fp32" if name == "paper" else "bf16")
        if name == "paper":  # same dtype as the CPU run: bytes comparable
            assert meta["peak_bytes"] == pytest.approx(real_peak, rel=0.05)
        assert meta["flops_per_iteration"] == pytest.approx(real_train, rel=0.02)
    assert sample_cost("tiny", 64, dtype="fp32")["flops_per_image"] == pytest.approx(real_sample, rel=0.02)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_training_estimate_parts_add_up():
    from echodistill.benchmarks.meta_run import train_cost

    paper = train_cost("tiny", "paper", 64)
    frozen = sum(part["bytes"] for part in paper["weights"].values())
    assert paper["frozen_bytes"] == frozen > 0
    assert paper["optimizer_bytes"] == 2 * paper["trainable_bytes"]  # AdamW: two fp32 moments per trained value
    assert paper["trainable_bytes"] == 4 * paper["trainable_parameters"]  # adapters, rows and heads stay fp32
    assert paper["between_iterations_bytes"] >= frozen + paper["trainable_bytes"] + paper["optimizer_bytes"]
    assert paper["peak_bytes"] == paper["between_iterations_bytes"] + paper["activation_bytes"]
    checkpointed = train_cost("tiny", "paper", 64, gradient_checkpointing=True)
    assert checkpointed["activation_bytes"] < paper["activation_bytes"]
    assert checkpointed["flops_per_iteration"] > paper["flops_per_iteration"]  # the recompute is executed


def test_sampling_flops_of_both_lines_are_counted_on_the_meta_device():
    from echodistill.benchmarks.meta_run import flops_by_model

    flops = flops_by_model("sdxl", "sample", 64)
    # 98.5 GFLOP per image is what `bench sample --model sd --size 64` counted on a CPU (docs/benchmarks.md).
    assert flops["sd"] == pytest.approx(98.5e9, rel=0.005)
    assert flops["sdxl"] > 2 * flops["sd"]  # a 2.6 G-parameter UNet and two text encoders
    lines = bench.flops_lines({"benchmark": "sample", "settings": {"size": 64}, "flops_by_model": flops})
    assert "FLOPs per image at 64 px" in lines and f"(SDXL / SD 2.x = {flops['sdxl'] / flops['sd']:.2f}x)" in lines
    assert flops_by_model("tiny", "sample", 64) is None and bench.flops_lines({"flops_by_model": None}) == ""


def test_sdxl_lite_trains_lora_and_other_lines_keep_their_presets():
    from echodistill.errors import ConfigError
    from echodistill.training.config import preset

    assert preset("lite", line="sdxl").adapter == "lora"
    assert preset("lite").adapter == preset("lite", line="sd").adapter == "custom_diffusion"
    assert preset("paper", line="sdxl") == preset("paper")
    assert preset("lite", line="sdxl", adapter="custom_diffusion").adapter == "custom_diffusion"  # overrides win
    with pytest.raises(ConfigError, match="unknown model line 'flux'; valid lines: sd, sdxl"):
        preset("lite", line="flux")


@pytest.mark.slow
def test_sdxl_lite_fits_a_24_gb_card_on_paper():
    """The real SDXL pair at 512 px, counted on the meta device (about a minute on one CPU core)."""
    from echodistill.benchmarks.memory import bench_memory

    report = bench_memory(("sdxl",), ("lite",), 512)
    (lite,) = report["results"]
    assert lite["adapter"] == "lora" and lite["weights_dtype"] == "bf16"
    assert lite["weights"]["teacher_unet"]["bytes"] == lite["weights"]["student_unet"]["bytes"] == 2 * 2_567_463_684
    assert lite["with_overhead_gb"] < 24


@pytest.mark.parametrize("command, report", [
    (["threads"], None), (["sample", "--model", "tiny"], None), (["train", "--model", "tiny"], None),
    (["memory", "--models", "tiny"], None), (["lr-sweep"], "lr_sweep.json"), (["quality"], "quality.json"),
    (["world-probe"], "world_probe.json")])
def test_an_earlier_report_is_refused_before_anything_loads_and_kept(command, report, tmp_path, capsys, monkeypatch):
    import echodistill.cli.bench as cli_bench

    out = tmp_path / ("earlier.json" if report is None else "run")
    written = out if report is None else out / report
    written.parent.mkdir(parents=True, exist_ok=True)
    written.write_text('{"finished": true}\n')
    monkeypatch.setattr(cli_bench, "load_world", lambda args: pytest.fail("the world loaded before the refusal"))
    assert main(["bench", *command, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} " in err and "pick another --out" in err and "--overwrite to replace it" in err, err
    assert ("--resume to continue it" in err) == (command == ["quality"])
    assert written.read_text() == '{"finished": true}\n'


def test_overwrite_replaces_an_earlier_json_report(tmp_path, capsys):
    out = tmp_path / "memory.json"
    out.write_text("{}\n")
    assert main(["bench", "memory", "--models", "tiny", "--presets", "lite", "--resolution", "64", "--out",
                 str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["settings"]["models"] == ["tiny"]


def test_merging_refuses_to_write_over_a_run_it_merges_or_an_earlier_merge(tmp_path, capsys):
    for folder in ("s0", "s1", "all"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "quality.json").write_text("{}\n")
    runs = [str(tmp_path / "s0"), str(tmp_path / "s1")]
    assert main(["bench", "quality-merge", *runs, "--out", runs[0], "--overwrite"]) == 2
    assert "is one of the runs merged" in capsys.readouterr().err
    assert main(["bench", "quality-merge", *runs, "--out", str(tmp_path / "all")]) == 2
    assert "holds an earlier report (quality.json)" in capsys.readouterr().err
    assert all((tmp_path / f / "quality.json").read_text() == "{}\n" for f in ("s0", "s1", "all"))


@pytest.mark.parametrize("command, out, message", [
    (["lr-sweep"], "", "--out '': name a folder for the report"),
    (["quality"], "", "--out '': name a folder for the report"),
    (["world-probe"], "", "--out '': name a folder for the report"),
    (["quality", "--overwrite"], "isdir", "quality.json is a folder, not a report"),
    (["lr-sweep", "--overwrite"], "isdir", "lr_sweep.json is a folder, not a report"),
    (["world-probe", "--overwrite"], "isdir", "world_probe.json is a folder, not a report"),
    (["quality", "--resume", "--overwrite"], "run", "--resume continues the report in --out and --overwrite"),
    (["quality", "--resume"], "damaged", "quality.json is not a readable quality report"),
    (["quality"], "a_file/run", "a_file is a file, not a folder; choose another --out"),
    (["lr-sweep"], "a_file", "a_file is a file, not a folder; choose another --out"),
    (["sample", "--model", "tiny"], "a_file/deeper/s.json", "a_file is not a folder"),
    (["memory"], "", "'': name a .json file"),
    (["memory"], "new_folder/", "names a folder: name a .json file"),
    (["memory"], "x" * 300 + ".json", "File name too long"),
])
def test_an_out_that_cannot_take_the_report_is_refused_before_anything_loads(command, out, message, tmp_path,
                                                                             capsys, monkeypatch):
    import echodistill.cli.bench as cli_bench

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a folder")
    for name in ("quality.json", "lr_sweep.json", "world_probe.json"):
        (tmp_path / "isdir" / name).mkdir(parents=True)
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "quality.json").write_text("{not json")
    monkeypatch.setattr(cli_bench, "load_world", lambda args: pytest.fail("the world loaded before the refusal"))
    try:
        code = main(["bench", *command, "--out", out])
    except SystemExit as exit_:  # argparse refuses a --out FILE.json while parsing
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and (tmp_path / "damaged" / "quality.json").read_text() == "{not json"


def test_a_second_benchmark_writing_the_same_out_is_refused(tmp_path, capsys, monkeypatch):
    import subprocess
    import sys
    import textwrap

    import echodistill.cli.bench as cli_bench

    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from echodistill.files import exclusive_output
        with exclusive_output({str(tmp_path / "run")!r}, "--out", activity="benchmark"):
            print("held", flush=True)
            time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    monkeypatch.setattr(cli_bench, "load_world", lambda args: pytest.fail("the world loaded beside another run"))
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["bench", "lr-sweep", "--out", str(tmp_path / "run")]) == 2
    finally:
        holder.kill()
        holder.wait()
    assert f"another benchmark is already writing {tmp_path / 'run'} (process {holder.pid}" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("not json", "is not a readable quality report"), ("[]", "is not a quality report"),
    ("{}", "is not a quality report"), ('{"settings": {}, "records": [{"concept": "a"}]}', "is not a quality report"),
    (b"\xff\xfe", "is not a readable quality report")])
def test_merging_a_damaged_report_names_it_without_a_traceback(content, message, tmp_path, capsys):
    for folder in ("s0", "s1"):
        (tmp_path / folder).mkdir()
    good = {"settings": {}, "records": [{"concept": "a", "seed": 0, "method": "m"}]}
    (tmp_path / "s0" / "quality.json").write_text(json.dumps(good))
    bad = tmp_path / "s1" / "quality.json"
    bad.write_bytes(content) if isinstance(content, bytes) else bad.write_text(content)
    assert main(["bench", "quality-merge", str(tmp_path / "s0"), str(tmp_path / "s1"),
                 "--out", str(tmp_path / "all")]) == 2
    err = capsys.readouterr().err
    assert f"{bad} {message}" in err and "Traceback" not in err
    assert not (tmp_path / "all").exists()


@pytest.mark.parametrize("argv, message", [
    (["quality", "--concepts", "dog"], "error: --concepts: unknown subject 'dog'"),
    (["quality", "--lr-scale", "echodistill=-1"], "error: --lr-scale"),
    (["quality", "--models", "nowhere"], "error: --models nowhere: nowhere/teacher is not a folder"),
    (["lr-sweep", "--concept", "2000001"], "error: --concept: procedural_2000001 is no fresh subject"),
    (["lr-sweep", "--families", "teacher"], "error: --families teacher: give one or more of echodistill"),
    (["lr-sweep", "--models", "nowhere"], "error: --models nowhere: nowhere/teacher is not a folder"),
    (["world-probe", "--models", "nowhere"], "error: --models nowhere: nowhere/teacher is not a folder"),
])
def test_training_benchmarks_refuse_a_bad_request_before_torch_loads(argv, message, tmp_path):
    # torch takes seconds to load: a mistyped name or folder is answered at once, and nothing is written
    script = ("import sys; from echodistill.cli import main; status = main(sys.argv[1:]); "
              "print('torch loaded' if 'torch' in sys.modules else 'no torch'); sys.exit(status)")
    done = subprocess.run([sys.executable, "-c", script, "bench", *argv, "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr
    assert done.stdout.strip() == "no torch"
    assert not (tmp_path / "out").exists()
