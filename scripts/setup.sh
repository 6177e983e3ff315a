#!/usr/bin/env bash
# Sets up brainsam from a fresh clone: .venv at the repo root with the pinned requirements and
# brainsam itself, Debian's mricron-data (the built-in atlas, Colin27 with AAL) and the sample data in
# sample-data/ (the MNI152 template from the nilearn wheel, with AAL by MNI coordinates as reference).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
echo "== installing pinned requirements (first time: several minutes, ~8 GB with torch)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .

if [ ! -f /usr/share/mricron/templates/ch2.nii.gz ]; then
  echo "== installing the built-in atlas package mricron-data"
  if [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q mricron-data || (apt-get update -q && apt-get install -y -q mricron-data)) >/dev/null
  else
    sudo apt-get install -y -q mricron-data >/dev/null
  fi
fi
.venv/bin/python -m brainsam.sample sample-data
echo "== ready"
