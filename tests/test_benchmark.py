"""Smoke test of the benchmark: the quick run on the tiny model yields every figure, finite."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.benchmark import format_table, run_benchmark
from bot.errors import ConfigError

RATIOS = ["single_stream_ratio", "aggregate_ratio_16", "aggregate_ratio_64", "resume_ratio_8k",
          "prefill_ratio", "max_loop_stall_ms", "max_logit_diff"]
RAW = ["ours_single_tok_s", "package_single_tok_s", "ours_aggregate_tok_s_16", "ours_aggregate_tok_s_64",
       "ours_decode_step_tok_s_16", "package_engine_tok_s", "ours_prefill_tok_s", "package_prefill_tok_s",
       "ttft_history_ms", "ttft_fresh_ms", "ttft_busy_ms", "rebuild_8k_s", "peak_rss_mb", "argmax_agreement"]


def test_quick_benchmark_reports_every_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAVEN_BENCH_CACHE", str(tmp_path))
    result = run_benchmark(size="tiny", quick=True)
    json.dumps(result)  # JSON-able as the CLI prints it
    for key in RATIOS + RAW:
        value = result[key]
        assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)
    for key in RATIOS[:5] + RAW[:-3]:
        assert result[key] > 0, key
    assert result["max_logit_diff"] <= 1e-4  # fp32 against the package on the tiny model
    assert result["argmax_agreement"] == 1.0
    assert (result["dtype"], result["device"], result["size"], result["threads"]) == ("fp32", "cpu", "tiny", [16, 64])
    assert result["torch_threads"] >= 1 and result["cuda_peak_mb"] is None
    assert (tmp_path / "rwkv7-tiny-seed0.pth").is_file()
    table = format_table(result)
    assert "single-stream decode" in table and "64 threads at once" in table and "prefill 512" in table
    assert result["busy_streams"] == 32 and "first token beside 32 replies" in table
    assert result["malloc_tuned"] in (True, False)
    # per-turn work besides the model, hot threads of 10 and (quick) 200 messages
    assert result["turn_overhead_ms_10"] > 0 and result["turn_overhead_ms_200"] > 0
    assert result["turn_overhead_ratio"] == pytest.approx(
        result["turn_overhead_ms_200"] / result["turn_overhead_ms_10"], rel=0.01)
    assert "turn overhead, thread of 200 / 10 msgs" in table
    # the machine record and the paths chosen for it
    machine = result["machine"]
    assert machine["cpu_model"] and machine["capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["cores"] >= 1 and isinstance(machine["native_bf16"], bool) and result["cpu_kind"]
    assert result["paths"]["source"] in ("measured", "cached") and result["paths"]["matmul"]
    assert result["torch_threads"] == result["paths"]["threads"]  # RAVEN_TORCH_THREADS unset
    assert f"CPU: {machine['cpu_model']}" in table and f"paths: {result['paths_summary']}" in table
    assert (tmp_path / "tuning.json").is_file()
    assert result["reference_dtype"] == "fp32" and result["notes"] == []
    # the engine against its own decode step, and where the rest of its time went
    for n in (16, 64):
        assert result[f"engine_step_ratio_{n}"] == pytest.approx(
            result[f"ours_aggregate_tok_s_{n}"] / result[f"ours_decode_step_tok_s_{n}"], rel=0.05)
        assert 0 < result[f"engine_decode_share_{n}"] < 1
        assert result[f"engine_full_step_ms_{n}"] > 0 and result[f"direct_step_ms_{n}"] > 0
        # 8 tokens a reply (quick), then its last token and the turn separator as closing rows
        assert 0.5 < result[f"engine_streamed_rows_{n}"] < 1
        assert f"engine gets {result[f'engine_step_ratio_{n}']:.0%} of it" in table


def test_bf16_without_native_support_says_so_and_measures_against_fp32(tmp_path: Path) -> None:
    """On a CPU that emulates bf16 (here: an AVX-512 machine lowered to AVX2 by the environment, as
    on an AVX2 Zen 3), one line says so and the package reference runs in fp32, not emulated bf16."""
    raven = str(Path(sys.executable).with_name("raven"))
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
           "RAVEN_BENCH_CACHE": str(tmp_path)}
    env.pop("RAVEN_TORCH_THREADS", None)
    done = subprocess.run([raven, "bench", "--size", "tiny", "--quick", "--dtype", "bf16", "--json"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["machine"]["capability"] == "AVX2" and result["machine"]["native_bf16"] is False
    assert result["reference_dtype"] == "fp32" and result["dtype"] == "bf16"
    notes = [line for line in done.stderr.splitlines() if line.startswith("raven bench: bf16 is emulated")]
    assert len(notes) == 1 and "cpu fp32" in notes[0]
    assert "onednn" not in " ".join(result["paths"]["matmul"].values())  # oneDNN refuses bf16 at AVX2
    table = format_table(result)
    assert "NOTE: bf16 is emulated" in table and "package reference: cpu fp32" in table
    assert ">= 1.5" not in table and ">= 20" not in table  # bf16's targets hold where bf16 is native


@pytest.mark.parametrize(("option", "message"), [
    ({"size": "7b"}, "size must be tiny or 0.1b"),
    ({"dtype": "fp64"}, "dtype must be fp32, bf16 or fp16"),
    ({"device": "tpu"}, "device must be cpu, cuda or cuda:N"),
    ({"device": "cuda"}, "no CUDA device is available"),
])
def test_options_that_cannot_run_are_refused_before_any_work(
        option: dict[str, str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if option.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    monkeypatch.setenv("RAVEN_BENCH_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match=message):
        run_benchmark(quick=True, **option)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []  # refused before the checkpoint was even written


def test_the_command_says_what_is_wrong_without_a_traceback(tmp_path: Path) -> None:
    raven = str(Path(sys.executable).with_name("raven"))
    done = subprocess.run([raven, "bench", "--size", "tiny", "--quick", "--dtype", "fp64"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "raven: dtype must be fp32, bf16 or fp16, not 'fp64'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("family", "batch"), [("v7", 16), ("v4", 4)])
def test_the_busy_host_benchmark_reports_both_modes_in_the_same_run(tmp_path: Path, family: str,
                                                                    batch: int) -> None:
    """``python -m bench.busy_host`` on the tiny models (the batched backend; the package's): each
    case measured with the thread watch and without, the ratio the quotient of the two. (Which count
    wins is the host's business, not a test's.)"""
    env = {**os.environ, "RAVEN_BENCH_CACHE": str(tmp_path)}
    env.pop("RAVEN_TORCH_THREADS", None)
    done = subprocess.run([sys.executable, "-m", "bench.busy_host", "--size", "tiny", "--rounds", "1",
                           "--family", family], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    if done.returncode and "one usable core" in done.stderr:
        pytest.skip("one usable core: there is no thread count to choose")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["size"], result["dtype"], result["rounds"]) == ("tiny", "fp32", 1)
    assert result["busy_processes"] == result["cores"] >= 2
    assert result["family"] == family and result["batch_replies"] == batch
    for case, key in (("quiet", "quiet_ratio"), ("busy_1", "busy_ratio_1"), ("busy_batch", "busy_ratio_batch")):
        figures = result[case]
        assert figures["watch_tok_s"] > 0 and figures["fixed_tok_s"] > 0
        assert result[key] == figures["ratio"] == pytest.approx(figures["watch_tok_s"] / figures["fixed_tok_s"],
                                                                rel=0.01)
        assert isinstance(figures["check_cost_ms"], float)
        assert figures["check_cost_share"] == pytest.approx(figures["check_cost_ms"] / 1e3 / 15, abs=1e-4)
        changes = figures["changes"]
        if case != "quiet":
            (changes,) = changes  # one round with the watch
        else:
            changes = [c for r in changes for c in r]  # three turns each, a small difference
        assert all(": " in c and " → " in c for c in changes)
    done = subprocess.run([sys.executable, "-m", "bench.busy_host", "--size", "7b"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "--size must be 0.1b or tiny" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "bench.busy_host", "--family", "v5"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "--family must be v7 or v4" in done.stderr
