#!/usr/bin/env bash
# Create (or update) the virtual environment in .venv at the repo root from a requirements file.
# Usage: scripts/setup_venv.sh [requirements-file]   (default: requirements.txt)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
req="${1:-requirements.txt}"
cd "$root"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -m pip install -q -r "$req"
