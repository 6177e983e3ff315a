#!/usr/bin/env bash
# OHIF on a DICOMweb archive, in one command: Orthanc with DICOMweb on 127.0.0.1 (its own
# configuration and storage under $STATE, not the system service), the NIfTI images of
# $STUDIES stored in it as DICOM MR series, and the brainsam server on that archive.
#
#   bash scripts/ohif.sh                      # then open http://127.0.0.1:8000/ohif/
#   PORT=8001 ORTHANC_PORT=8043 bash scripts/ohif.sh --conf embedding_dir none
#
# Settings (environment): PORT (8000, the server), ORTHANC_PORT (8042), STATE (runs/ohif:
# Orthanc's storage and the server's DICOM cache; kept between runs), STUDIES
# (sample-data/studies). Arguments are passed on to start_server. Ctrl-C (or SIGTERM) stops
# the server and Orthanc. Run `bash scripts/setup.sh` once first.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${PORT:-8000}
ORTHANC_PORT=${ORTHANC_PORT:-8042}
STATE=${STATE:-runs/ohif}
STUDIES=${STUDIES:-sample-data/studies}
PLUGIN=/usr/share/orthanc/plugins/libOrthancDicomWeb.so

if [ ! -x .venv/bin/python ] || ! command -v Orthanc >/dev/null || [ ! -f "$PLUGIN" ]; then
  echo "error: .venv, Orthanc or its DICOMweb plugin is missing: run bash scripts/setup.sh first" >&2
  exit 1
fi
for port in "$PORT" "$ORTHANC_PORT"; do
  if .venv/bin/python -c "import socket, sys; sys.exit(socket.socket().connect_ex(('127.0.0.1', $port)) != 0)"; then
    echo "error: port $port is taken (the system's Orthanc service? stop it, or set PORT / ORTHANC_PORT)" >&2
    exit 1
  fi
done

mkdir -p "$STATE/orthanc"
STATE=$(cd "$STATE" && pwd)
cat > "$STATE/orthanc.json" <<EOF
{
  "Name": "brainsam",
  "StorageDirectory": "$STATE/orthanc",
  "IndexDirectory": "$STATE/orthanc",
  "HttpPort": $ORTHANC_PORT,
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "DicomServerEnabled": false,
  "OverwriteInstances": true,
  "ConcurrentJobs": 1,
  "HttpThreadsCount": 8,
  "SaveJobs": false,
  "Plugins": ["$PLUGIN"],
  "DicomWeb": {"Enable": true, "Root": "/dicom-web/", "EnableWado": true, "WadoRoot": "/wado",
               "Host": "127.0.0.1:$ORTHANC_PORT", "Ssl": false,
               "StudiesMetadata": "Full", "SeriesMetadata": "Full"}
}
EOF

orthanc="" server=""
stop() {  # the server leads its own process group (with its scoring and train processes)
  trap - EXIT INT TERM
  [ -z "$server" ] || kill -TERM -- "-$server" 2>/dev/null || true
  [ -z "$orthanc" ] || kill -TERM "$orthanc" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "== Orthanc on http://127.0.0.1:$ORTHANC_PORT (log: $STATE/orthanc.log)"
Orthanc "$STATE/orthanc.json" >"$STATE/orthanc.log" 2>&1 &
orthanc=$!
DICOMWEB="http://127.0.0.1:$ORTHANC_PORT/dicom-web"
for _ in $(seq 100); do
  if .venv/bin/python -c "import urllib.request; urllib.request.urlopen('$DICOMWEB/studies', timeout=2)" 2>/dev/null; then break; fi
  kill -0 "$orthanc" 2>/dev/null || { echo "error: Orthanc stopped:" >&2; tail -20 "$STATE/orthanc.log" >&2; exit 1; }
  sleep 0.2
done

echo "== storing $STUDIES as DICOM MR series"
.venv/bin/python -m brainsam.nifti2dicom "$STUDIES" --stow "$DICOMWEB"

echo "== brainsam server on http://127.0.0.1:$PORT (OHIF: http://127.0.0.1:$PORT/ohif/)"
export MONAI_LABEL_DICOMWEB_SEARCH_FILTER='{"Modality":"MR"}'
export MONAI_LABEL_DICOMWEB_CACHE_PATH="$STATE/cache"
export MONAI_LABEL_TRACKING_ENABLED=false
setsid .venv/bin/python -m monailabel.main start_server --app apps/brainsam --studies "$DICOMWEB" \
  --host 127.0.0.1 --port "$PORT" "$@" &
server=$!
wait "$server"
