#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) inside an 8-minute limit, with facecls's environment settings.
# Usage: [PYTHON=.venv/bin/python] bash benchmarks/gpu_check.sh [--tiny] [--epochs N] [--workdir DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export FACECLS_OFFLINE=1  # random initialisation: nothing to download, and nothing may be tried
exec timeout --signal=TERM --kill-after=20 480 "${PYTHON:-python3}" "$here/gpu_check.py" "$@"
