#!/usr/bin/env bash
# Sets up brainsam from a fresh clone: .venv at the repo root with the pinned requirements and
# brainsam itself, Debian's mricron-data (the built-in atlas, Colin27 with AAL), the sample data in
# sample-data/ (the MNI152 template from the nilearn wheel, with AAL by MNI coordinates as reference),
# and Debian's Orthanc and Chromium for OHIF.
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

# Debian packages: the built-in atlas (mricron-data); Orthanc with DICOMweb and Chromium for OHIF
# (scripts/ohif.sh, tests/test_ohif.py). Playwright drives this Chromium; no browser is downloaded.
missing=()
for package in mricron-data orthanc orthanc-dicomweb chromium; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing Debian packages: ${missing[*]}"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  install() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; }
  (install || ($sudo apt-get update -q && install)) >/dev/null
fi
.venv/bin/python -m brainsam.sample sample-data
echo "== ready"
