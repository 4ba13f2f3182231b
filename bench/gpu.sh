#!/usr/bin/env bash
# The CUDA path on one GPU (bench/gpu.py): bf16 matmul peak, the expert service's grouped expert execution
# against it, the in-process engine's tok/s with --device cuda. Exit code 2 where torch sees no CUDA device.
#
#   bench/gpu.sh [--model DIR] [--concurrency 1,16,64] [--max-new-tokens 64] [--markdown]
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[[ -x $python ]] || python=python3
exec "$python" -m bench.gpu "$@"
