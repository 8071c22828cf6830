#!/usr/bin/env bash
# Install flarc (CPU torch first, so pip never pulls a CUDA build) and run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e '.[demo]'
flarc demo "$@"
