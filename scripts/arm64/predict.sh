#!/usr/bin/env bash
# The arm64 serving proof (not part of CI): `edge-agent predict` on an exported model inside an arm64 Debian
# chroot under qemu user-mode emulation, with the plain onnxruntime aarch64 wheel from PyPI (no torch, no
# onnxruntime-training), printing the same labels as the same command on this x86_64 host.
#
#   sudo scripts/arm64/predict.sh [RUN_DIR]     # default RUN_DIR: /var/tmp/heterotune-arm64/predict-<time>
#
# Steps:
#   1. build (or reuse) a serving-only rootfs in $SERVE_ROOT (default /var/tmp/heterotune-arm64/serve-rootfs):
#      debootstrap arm64 bookworm minbase + python3-venv, then /opt/serve-venv with only what
#      `python -m edge_agent.cli predict --model` imports: onnxruntime numpy tokenizers typer pydantic
#      (idempotent: each stage leaves a marker file; the functions come from build-rootfs.sh);
#   2. on the host with the builder venv: train MiniLM-L3 one short round (make_model.py) and run the real
#      `edge-agent export` on the device state it saved;
#   3. `edge-agent predict --model PKG --file texts.jsonl --json` on the host (onnxruntime-training's
#      InferenceSession) and in the chroot (plain onnxruntime, aarch64, QEMU_CPU emulated core);
#   4. compare labels (must be identical) and probabilities (compare_predictions.py); exit 0 only on PASS.
# RUN_DIR gets the package, texts.jsonl, x86.json, arm64.json, the unrounded probabilities of both
# (x86-probs.npy, arm64-probs.npy), compare.json and summary.json.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
SERVE_ROOT=${SERVE_ROOT:-/var/tmp/heterotune-arm64/serve-rootfs}
RUN_DIR=${1:-/var/tmp/heterotune-arm64/predict-$(date +%Y%m%d-%H%M%S)}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}     # the x86_64 builder venv (onnxruntime-training)
QEMU_CPU=${QEMU_CPU:-cortex-a76}              # the Raspberry Pi 5's core, as run-round.sh emulates
SERVE_PACKAGES=(onnxruntime numpy tokenizers typer pydantic)
REPO_IN_ROOT=/opt/heterotune
RUN_IN_ROOT=/opt/arm64-run

# host_tools, mount_pseudo, umount_pseudo and in_root, acting on $ARM64_ROOT.
ARM64_ROOT=$SERVE_ROOT
# shellcheck source=scripts/arm64/build-rootfs.sh
. "$HERE/build-rootfs.sh"

# predict in the chroot: a clean environment, the repository on PYTHONPATH, the emulated CPU model (QEMU_CPU is
# read by every qemu-user process, so it must survive `env -i`).
in_serve() { chroot "$SERVE_ROOT" /usr/bin/env -i HOME=/root PATH=/opt/serve-venv/bin:/usr/bin:/bin LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$REPO_IN_ROOT" QEMU_CPU="$QEMU_CPU" OMP_NUM_THREADS=1 "$@"; }

build_serve_rootfs() {
    host_tools
    mkdir -p "$(dirname "$SERVE_ROOT")"
    if [ ! -e "$SERVE_ROOT/.debootstrap-done" ]; then
        log "debootstrap --arch=arm64 $SUITE into $SERVE_ROOT (serving only)"
        rm -rf "$SERVE_ROOT"
        debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,time \
            "$SUITE" "$SERVE_ROOT" "$MIRROR"
        touch "$SERVE_ROOT/.debootstrap-done"
    fi
    mount_pseudo
    if [ ! -e "$SERVE_ROOT/.serve-venv-done" ]; then
        log "creating /opt/serve-venv: pip install ${SERVE_PACKAGES[*]} (aarch64 wheels from PyPI)"
        in_root python3 -m venv /opt/serve-venv
        in_root /opt/serve-venv/bin/pip install -q "${SERVE_PACKAGES[@]}"
        touch "$SERVE_ROOT/.serve-venv-done"
    fi
    # No host /sys while onnxruntime runs: its cpuinfo library reads the x86_64 host's CPU list from /sys, then
    # fails to parse the host's x86 /proc/cpuinfo as an ARM one, and the process dies with SIGSEGV under
    # qemu-user (measured here: /proc + /sys mounted -> "qemu: uncaught target signal 11"; without /sys it
    # warns "cpuinfo_initialize failed" and runs).
    mountpoint -q "$SERVE_ROOT/sys" && umount -l "$SERVE_ROOT/sys"
    return 0
}

cleanup() {
    for m in "$RUN_IN_ROOT" "$REPO_IN_ROOT"; do
        mountpoint -q "$SERVE_ROOT$m" && umount -l "$SERVE_ROOT$m" || true
    done
    umount_pseudo
}
trap cleanup EXIT

now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 2))" "$1" "$2"; }

main_predict() {
    local t0 t1
    t0=$(now)
    build_serve_rootfs
    log "serving rootfs ready in $(elapsed "$t0" "$(now)") s"
    mkdir -p "$RUN_DIR" "$SERVE_ROOT$REPO_IN_ROOT" "$SERVE_ROOT$RUN_IN_ROOT"
    mountpoint -q "$SERVE_ROOT$REPO_IN_ROOT" || { mount --bind "$REPO" "$SERVE_ROOT$REPO_IN_ROOT"
        mount -o remount,bind,ro "$SERVE_ROOT$REPO_IN_ROOT"; }
    mountpoint -q "$SERVE_ROOT$RUN_IN_ROOT" || mount --bind "$RUN_DIR" "$SERVE_ROOT$RUN_IN_ROOT"

    local machine ort_info
    machine=$(in_serve uname -m)
    ort_info=$(in_serve /opt/serve-venv/bin/python -c \
        'import platform, onnxruntime as o, numpy, tokenizers; print(platform.machine(), platform.python_version(), o.__version__, ",".join(o.get_available_providers()), numpy.__version__, tokenizers.__version__)')
    log "inside: uname -m $machine; python, onnxruntime, provider, numpy, tokenizers: $ort_info"
    if in_serve /opt/serve-venv/bin/python -c 'import onnxruntime.training' 2>/dev/null; then
        log "error: the chroot's onnxruntime has the training API; this proof is about the plain package"; exit 1
    fi
    if in_serve /opt/serve-venv/bin/python -c 'import torch' 2>/dev/null; then
        log "error: torch is installed in the serving venv"; exit 1
    fi

    log "host: train MiniLM-L3 one round and save the device state"
    (cd "$REPO" && HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 \
        "$PYTHON" "$HERE/make_model.py" --work "$RUN_DIR/host" > "$RUN_DIR/make_model.json")
    rm -rf "$RUN_DIR/model"
    (cd "$REPO" && HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 "$PYTHON" -m edge_agent.cli export \
        --state-dir "$RUN_DIR/host/state" --out "$RUN_DIR/model" --threads 1)
    cp "$RUN_DIR/host/texts.jsonl" "$RUN_DIR/texts.jsonl"
    local n
    n=$(grep -c . "$RUN_DIR/texts.jsonl")

    log "host (x86_64, $("$PYTHON" -c 'import onnxruntime as o; print("onnxruntime", o.__version__)')): predict $n texts"
    t0=$(now)
    (cd "$REPO" && OMP_NUM_THREADS=1 "$PYTHON" -m edge_agent.cli predict --model "$RUN_DIR/model" \
        --file "$RUN_DIR/texts.jsonl" --json --threads 1 > "$RUN_DIR/x86.json")
    t1=$(now)
    local x86_s
    x86_s=$(elapsed "$t0" "$t1")

    log "chroot (aarch64 under qemu, QEMU_CPU=$QEMU_CPU): predict 1 text, then the $n texts"
    t0=$(now)
    in_serve /opt/serve-venv/bin/python -m edge_agent.cli predict --model "$RUN_IN_ROOT/model" \
        --text "the flight was delayed again" --json --threads 1 > "$RUN_DIR/arm64-one.json"
    t1=$(now)
    local one_s
    one_s=$(elapsed "$t0" "$t1")
    t0=$(now)
    in_serve /opt/serve-venv/bin/python -m edge_agent.cli predict --model "$RUN_IN_ROOT/model" \
        --file "$RUN_IN_ROOT/texts.jsonl" --json --threads 1 > "$RUN_DIR/arm64.json"
    t1=$(now)
    local arm_s
    arm_s=$(elapsed "$t0" "$t1")

    log "unrounded probabilities on both sides (raw_probs.py; --json rounds to 6 decimals)"
    (cd "$REPO" && PYTHONPATH="$REPO" OMP_NUM_THREADS=1 "$PYTHON" "$HERE/raw_probs.py" --model "$RUN_DIR/model" \
        --file "$RUN_DIR/texts.jsonl" --out "$RUN_DIR/x86-probs.npy")
    in_serve /opt/serve-venv/bin/python "$REPO_IN_ROOT/scripts/arm64/raw_probs.py" --model "$RUN_IN_ROOT/model" \
        --file "$RUN_IN_ROOT/texts.jsonl" --out "$RUN_IN_ROOT/arm64-probs.npy"

    local status=0
    "$PYTHON" "$HERE/compare_predictions.py" "$RUN_DIR/x86.json" "$RUN_DIR/arm64.json" \
        --raw "$RUN_DIR/x86-probs.npy" "$RUN_DIR/arm64-probs.npy" --out "$RUN_DIR/compare.json" || status=$?
    local size
    size=$(du -sxm "$SERVE_ROOT" --exclude="$SERVE_ROOT$REPO_IN_ROOT" --exclude="$SERVE_ROOT$RUN_IN_ROOT" \
        --exclude="$SERVE_ROOT/proc" --exclude="$SERVE_ROOT/sys" --exclude="$SERVE_ROOT/dev" | cut -f1)
    "$PYTHON" - "$RUN_DIR" "$machine" "$ort_info" "$QEMU_CPU" "$n" "$x86_s" "$one_s" "$arm_s" "$size" <<'EOF'
import json, sys
from pathlib import Path
run, machine, info, cpu, n, x86_s, one_s, arm_s, size = sys.argv[1:]
n, x86_s, one_s, arm_s = int(n), float(x86_s), float(one_s), float(arm_s)
py, ort, provider, np_, tok = info.split()[1:]
summary = {"uname_m_inside": machine, "python_inside": py, "onnxruntime_inside": ort, "providers": provider,
           "numpy_inside": np_, "tokenizers_inside": tok, "qemu_cpu": cpu, "rootfs_mb": int(size), "texts": n,
           "x86_predict_s": x86_s, "arm64_predict_one_text_s": one_s, "arm64_predict_all_s": arm_s,
           # the command's start-up (python, imports, session creation) is the one-text run; the rest is inference
           "arm64_s_per_text": round((arm_s - one_s) / max(n - 1, 1), 3),
           "compare": json.loads((Path(run) / "compare.json").read_text())}
(Path(run) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
EOF
    log "finished with status $status; see $RUN_DIR/summary.json"
    return "$status"
}

main_predict
