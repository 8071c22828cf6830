#!/usr/bin/env bash
# Install flarc with its test dependencies (CPU torch first, from the local wheel) and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e '.[test]'
ruff check .
python3 -m pytest -q -p no:cacheprovider
