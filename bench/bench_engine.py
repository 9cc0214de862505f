"""Benchmark the batched RWKV-7 engine against the plain ``rwkv`` package (same as ``raven bench``).

    .venv/bin/python bench/bench_engine.py                       # 0.1B, fp32, CPU: a few minutes
    .venv/bin/python bench/bench_engine.py --dtype bf16 --json
    .venv/bin/python bench/bench_engine.py --size tiny --quick   # seconds: a smoke run
    python bench/bench_engine.py --device cuda --dtype fp16

What each figure means, and how it is measured: ``bot/benchmark.py``. Results: ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.benchmark import format_table, run_benchmark
from bot.errors import RavenError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "0.1b"], default="0.1b")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", default="16,64", help="comma-separated thread counts (default 16,64)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run; noisy figures")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    threads = tuple(int(n) for n in args.threads.split(",") if n.strip())

    def progress(message: str) -> None:
        print(f"... {message}", file=sys.stderr, flush=True)

    try:
        result = run_benchmark(size=args.size, dtype=args.dtype, device=args.device, threads=threads,
                               quick=args.quick, progress=progress)
    except RavenError as exc:
        parser.exit(2, f"{parser.prog}: {exc}\n")
    print(json.dumps(result) if args.json else format_table(result))


if __name__ == "__main__":
    main()
