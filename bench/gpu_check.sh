#!/usr/bin/env bash
# Prove the CUDA path in one command (under 8 minutes): the CUDA oracle tests (batched RWKV-7 vs the
# rwkv package on cuda fp16 / bf16, B = 1, 8, 64; fp32 on CUDA through tests/test_rwkv7_batched.py)
# and the engine benchmark on cuda fp16, written together as one JSON file.
#
#   bench/gpu_check.sh [OUT.json]          (default: gpu_check.json)
#
# PYTHON picks the interpreter (default .venv/bin/python, else python3); it needs torch with CUDA,
# the rwkv package and this project's dependencies. Exit status 0 only if the tests passed, none
# was skipped for want of CUDA, and the benchmark ran. GPU_CHECK_DRY=1 runs the same steps on a CPU
# machine (the benchmark as a tiny cpu quick run) to check the script itself; its JSON says "dry".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check.json}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d)
START=$(date +%s)

DRY=${GPU_CHECK_DRY:-0}
BENCH_ARGS=(--device cuda --dtype fp16)
if [ "$DRY" = 1 ]; then
  BENCH_ARGS=(--device cpu --size tiny --quick)
else
  "$PY" -c 'import torch, sys; ok = torch.cuda.is_available(); print("cuda:", ok, torch.__version__,
torch.cuda.get_device_name(0) if ok else ""); sys.exit(0 if ok else 3)' || {
    echo "gpu_check: torch sees no CUDA device; nothing to prove here" >&2; exit 3; }
fi

echo "gpu_check: oracle tests (budget 240 s)" >&2
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -rs --junitxml="$WORK/junit.xml" \
  tests/test_cuda_oracle.py tests/test_rwkv7_batched.py -k "cuda" >"$WORK/pytest.log" 2>&1
TESTS_RC=$?
tail -n 25 "$WORK/pytest.log" >&2

echo "gpu_check: raven bench ${BENCH_ARGS[*]} (budget 200 s)" >&2
RAVEN_BENCH_CACHE="$WORK/cache" timeout 200 "$PY" -c 'from bot.app.cli import app; app(prog_name="raven")' \
  bench "${BENCH_ARGS[@]}" --json >"$WORK/bench.json" 2>"$WORK/bench.err"
BENCH_RC=$?
tail -n 5 "$WORK/bench.err" >&2

"$PY" - "$WORK" "$OUT" "$TESTS_RC" "$BENCH_RC" "$START" "$DRY" <<'PYEOF'
import json, subprocess, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path
work, out, tests_rc, bench_rc, start = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
dry = sys.argv[6] == "1"
tests = {"rc": tests_rc}
try:
    suite = ET.parse(work / "junit.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests |= {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    tests["cases"] = [{"name": c.get("name"), "seconds": float(c.get("time", 0)),
                       "file": c.get("classname", ""), "outcome": next((x.tag for x in c if x.tag in ("failure", "error", "skipped")), "passed")}
                      for c in suite.iter("testcase")]
except (OSError, ET.ParseError, AttributeError) as exc:
    tests["junit_error"] = str(exc)
tests["log_tail"] = (work / "pytest.log").read_text(errors="replace")[-4000:] if (work / "pytest.log").exists() else ""
try:
    bench = json.loads((work / "bench.json").read_text())
except (OSError, ValueError):
    bench = {"error": (work / "bench.err").read_text(errors="replace")[-4000:] if (work / "bench.err").exists() else "no output"}
bench["rc"] = bench_rc
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.TimeoutExpired):
    smi = ""
cuda_skips = [c["name"] for c in tests.get("cases", [])  # the oracle file must run in full
              if c["outcome"] == "skipped" and "test_cuda_oracle" in c["file"]]
ok = tests_rc == 0 and bench_rc == 0 and (dry or not cuda_skips) and tests.get("tests", 0) > 0
result = {"ok": ok, "dry": dry, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "elapsed_s": round(time.time() - start, 1),
          "gpu": smi, "cuda_tests_skipped": cuda_skips, "tests": tests, "bench": bench}
try:
    result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    pass
Path(out).write_text(json.dumps(result, indent=1))
print(f"gpu_check: {'OK' if ok else 'FAILED'} in {result['elapsed_s']} s -> {out}", file=sys.stderr)
sys.exit(0 if ok else 1)
PYEOF
