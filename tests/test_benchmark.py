"""Smoke test of the benchmark: the quick run on the tiny model yields every figure, finite."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bot.benchmark import format_table, run_benchmark

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
