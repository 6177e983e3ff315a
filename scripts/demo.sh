#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and starts the brainsam MONAI Label server on the sample data,
# listening on 127.0.0.1 only. Extra arguments go to `monailabel start_server` (e.g. --port 8001).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MONAI_LABEL_TRACKING_ENABLED=false
exec .venv/bin/python -m monailabel.main start_server --app apps/brainsam --studies sample-data/studies --host 127.0.0.1 --port 8000 "$@"
