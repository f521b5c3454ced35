#!/usr/bin/env bash
# The prepared GPU run (bench/gpu/run.py): from the repository root, on a fresh GPU machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python3}" bench/gpu/run.py "$@"
