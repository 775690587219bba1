"""The throughput benchmark runs end to end: every side in its own environment, every block measured.
(A smoke test on a tiny configuration; the speed itself is measured by the benchmark, never here.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

from facecls.runtime.allocator import JEMALLOC_PATHS

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_benchmark_measures_three_sides(tmp_path, faces_data):
    results = tmp_path / "results.json"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "throughput.py"),
        "--quick",
        "--faces", str(faces_data / "five_celebrity"),
        "--models", "mobilenet_v2",
        "--sizes", "64",
        "--identities", "3",
        "--per-identity", "2",
        "--predict-images", "16",
        "--data-images", "16",
        "--memory",
        "--memory-steps", "1",
        "--workdir", str(tmp_path / "work"),
        "--json", str(results),
    ]  # fmt: skip
    facecls_settings = ("LD_PRELOAD", "MALLOC_CONF", "OMP_WAIT_POLICY", "FACECLS_JEMALLOC")
    env = {k: v for k, v in os.environ.items() if k not in facecls_settings}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| mobilenet_v2 | 64 |" in done.stdout
    report = json.loads(results.read_text())
    assert report["sides"] == ["naive", "naive-alloc", "facecls"]
    (config,) = report["configs"]
    for block in ("data", "train", "predict"):
        assert all(config[block][side] > 0 for side in report["sides"]), config[block]
        assert config[block]["ratio"] == config[block]["facecls"] / config[block]["naive"]
    environment = report["environment"]
    assert "jemalloc" not in environment["naive"]["ld_preload"] and environment["naive"]["malloc_conf"] == ""
    if any(os.path.exists(p) for p in JEMALLOC_PATHS):
        for side in ("naive-alloc", "facecls"):
            assert "jemalloc" in environment[side]["ld_preload"]
            assert "dirty_decay_ms:-1" in environment[side]["malloc_conf"]
    assert config["runtime"]["depthwise_fp32_input_grad"] == (config["runtime"]["precision"] == "bf16")
    assert all(config["memory"][side]["main_mb"] > 0 for side in ("naive", "facecls"))
    for kind in ("conv", "matmul"):
        assert all(report[f"{kind}_peak_gflops"][p] > 0 for p in ("fp32", "bf16")), report
    assert "percentages of the conv peak" in done.stdout


def test_gpu_check_script_runs_on_cpu_at_its_tiny_size(tmp_path):
    """The GPU check is ready for a GPU machine: on a CPU its --tiny mode trains and reports every setting."""
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=480, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert [(r["recipe"], r["setting"]) for r in rows] == [("mobilenet_v2", "fp32"), ("mobilenet_v2", "bf16+cl")]
    assert all(r["exit"] == 0 and r["img_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in rows)
    assert "NCCL: skipped (fewer than 2 GPUs)" in done.stdout
