#!/usr/bin/env bash
# The main job: set up .venv, fill sample-data/studies with phantom CTs, get weights (the released
# SuPreM files when the hub is reachable, else starter weights trained here), start the server.
# Usage: scripts/demo.sh [PORT]     (binds 127.0.0.1; default port 8000)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
port="${1:-8000}"
cd "$root"
bash scripts/setup_venv.sh requirements.txt
# prepare_sample.py prints, last, the --conf the weights need (starter weights: their own grid and organs).
server_conf="$(.venv/bin/python scripts/prepare_sample.py --studies sample-data/studies --app apps/suprem | tail -n 1)"
export PATH="$root/.venv/bin:$PATH" MONAILABEL_PYEXE="$root/.venv/bin/python"
# prepare_sample.py has already downloaded what the hub offers; do not ask again at start-up.
exec monailabel start_server --app apps/suprem --studies sample-data/studies \
  --host 127.0.0.1 --port "$port" --conf models all $server_conf --conf use_pretrained_model false
