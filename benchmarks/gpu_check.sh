#!/usr/bin/env bash
# The GPU check (issue 12): the CUDA paths the CPU test suite cannot reach -- the embedded teacher sampling and
# training in float32, bf16 and fp16, DMD2 with LoRA and gradient checkpointing on a tiny SDXL-like pipeline
# (max_memory_gb), a 2-process DDP launch when two GPUs are visible -- in at most 8 minutes, nothing downloaded.
# Prints one table (benchmarks/gpu_check.py has the checks). Exit 0: every check ran or was skipped; 1: a check
# failed (its row says how); 2: no CUDA device; 124: stopped at the 8-minute limit.
#
#   bash benchmarks/gpu_check.sh           # on a CUDA machine
#   bash benchmarks/gpu_check.sh --cpu     # the dry run on the CPU (small; what tests/test_gpu_check.py runs)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
LIMIT_S="${GPU_CHECK_LIMIT_S:-480}"
timeout --kill-after=10 "$LIMIT_S" "$PY" benchmarks/gpu_check.py "$@"
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "gpu_check: stopped at the ${LIMIT_S}-second limit; the rows printed above are the checks that finished" >&2
    exit 124
fi
exit "$rc"
