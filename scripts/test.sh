#!/usr/bin/env bash
# Set up .venv with the test tools and run the whole test suite (CPU, no network needed).
# Extra arguments go to pytest, e.g. scripts/test.sh -k download
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_venv.sh requirements-dev.txt
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
