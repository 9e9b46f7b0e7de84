#!/usr/bin/env bash
# The arm64 proof (not part of CI): an emulated aarch64 edge agent joins a coordinator on this host's loopback
# and completes one federated round with the PyTorch backend on paraphrase-MiniLM-L3.
#
#   sudo scripts/arm64/run-round.sh [RUN_DIR]        # default RUN_DIR: /var/tmp/heterotune-arm64/run-<time>
#
# Steps: build (or reuse) the arm64 Debian rootfs with the agent's dependencies (build-rootfs.sh); bind-mount
# this repository and the run directory into it; run scripts/arm64/run_round.py with the repository's x86_64
# builder venv, which starts mosquitto and the coordinator on 127.0.0.1 and the agent inside the chroot under
# qemu-aarch64. A chroot shares the host's network namespace, so the agent reaches the loopback broker.
# ARM64_TIMEOUT (seconds, default 10800) bounds the whole round; the result is in RUN_DIR/summary.json.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
ARM64_ROOT=${ARM64_ROOT:-/var/tmp/heterotune-arm64/rootfs}
RUN_DIR=${1:-/var/tmp/heterotune-arm64/run-$(date +%Y%m%d-%H%M%S)}
ARM64_TIMEOUT=${ARM64_TIMEOUT:-10800}
REPO_IN_ROOT=/opt/heterotune
RUN_IN_ROOT=/opt/arm64-run
export ARM64_ROOT

log() { printf '[arm64 %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

"$HERE/build-rootfs.sh"

mkdir -p "$RUN_DIR" "$ARM64_ROOT$REPO_IN_ROOT" "$ARM64_ROOT$RUN_IN_ROOT"
cleanup() {
    for m in "$RUN_IN_ROOT" "$REPO_IN_ROOT" /sys /dev /proc; do
        mountpoint -q "$ARM64_ROOT$m" && umount -l "$ARM64_ROOT$m" || true
    done
}
trap cleanup EXIT
mountpoint -q "$ARM64_ROOT/proc" || mount -t proc proc "$ARM64_ROOT/proc"
mountpoint -q "$ARM64_ROOT/dev" || mount --bind /dev "$ARM64_ROOT/dev"
mountpoint -q "$ARM64_ROOT/sys" || mount --bind /sys "$ARM64_ROOT/sys"
mount --bind "$REPO" "$ARM64_ROOT$REPO_IN_ROOT"
mount -o remount,bind,ro "$ARM64_ROOT$REPO_IN_ROOT"
mount --bind "$RUN_DIR" "$ARM64_ROOT$RUN_IN_ROOT"

log "run directory $RUN_DIR; timeout ${ARM64_TIMEOUT}s"
started=$(date +%s)
set +e
timeout --kill-after=60 "$ARM64_TIMEOUT" "$REPO/.venv/bin/python" "$HERE/run_round.py" --root "$ARM64_ROOT" \
    --run-dir "$RUN_DIR" --run-in-root "$RUN_IN_ROOT" --repo-in-root "$REPO_IN_ROOT" "${@:2}" \
    2>&1 | tee "$RUN_DIR/host.log"
status=${PIPESTATUS[0]}
set -e
log "finished with status $status after $(( $(date +%s) - started )) s; see $RUN_DIR/summary.json"
exit "$status"
