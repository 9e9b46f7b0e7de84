#!/usr/bin/env bash
# Build an arm64 Debian 12 root filesystem with debootstrap and install the edge agent's arm64 dependencies
# in it from PyPI, running arm64 binaries under qemu user-mode emulation (binfmt_misc).
#
# Not part of CI: it downloads ~1 GB and takes tens of minutes under emulation. Idempotent: each stage
# leaves a marker file and is skipped when it is there.
#
#   sudo scripts/arm64/build-rootfs.sh            # rootfs in $ARM64_ROOT (default /var/tmp/heterotune-arm64/rootfs)
#
# What it proves: the agent's device dependencies (torch CPU wheel, numpy, paho-mqtt, tokenizers, ...) install
# on Linux aarch64 from the package registries alone; no onnxruntime-training wheel is needed there.
set -euo pipefail

ARM64_ROOT=${ARM64_ROOT:-/var/tmp/heterotune-arm64/rootfs}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
TORCH_VERSION=${TORCH_VERSION:-2.9.1}   # PyPI's aarch64 wheels of torch are CPU builds

log() { printf '[arm64 %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

host_tools() {
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    [ -x /usr/bin/qemu-aarch64-static ] || missing+=(qemu-user-static)
    command -v update-binfmts >/dev/null || missing+=(binfmt-support)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing host packages: ${missing[*]}"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    fi
    # In containers binfmt_misc is often not mounted; without it the kernel cannot hand arm64 ELF files to qemu.
    if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
        mount binfmt_misc -t binfmt_misc /proc/sys/fs/binfmt_misc
    fi
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        update-binfmts --enable qemu-aarch64
    fi
    grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
        || log "warning: qemu-aarch64 binfmt entry lacks the F flag; the chroot needs qemu-aarch64-static inside it"
}

mount_pseudo() {
    # Everything the chroot needs from the host; unmounted by the caller's trap.
    mountpoint -q "$ARM64_ROOT/proc" || mount -t proc proc "$ARM64_ROOT/proc"
    mountpoint -q "$ARM64_ROOT/dev" || mount --bind /dev "$ARM64_ROOT/dev"
    mountpoint -q "$ARM64_ROOT/sys" || mount --bind /sys "$ARM64_ROOT/sys"
    cp /etc/resolv.conf "$ARM64_ROOT/etc/resolv.conf"
    # The host's CA bundle: package-registry TLS may be intercepted by a site CA the Debian bundle lacks.
    cp /etc/ssl/certs/ca-certificates.crt "$ARM64_ROOT/etc/ssl/certs/host-ca-certificates.crt"
}

umount_pseudo() {
    for m in sys dev proc; do
        mountpoint -q "$ARM64_ROOT/$m" && umount -l "$ARM64_ROOT/$m" || true
    done
}

in_root() { chroot "$ARM64_ROOT" /usr/bin/env -i HOME=/root PATH=/usr/local/bin:/usr/bin:/bin \
    PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
    LANG=C.UTF-8 "$@"; }

main() {
    host_tools
    mkdir -p "$(dirname "$ARM64_ROOT")"
    if [ ! -e "$ARM64_ROOT/.debootstrap-done" ]; then
        log "debootstrap --arch=arm64 $SUITE into $ARM64_ROOT"
        rm -rf "$ARM64_ROOT"
        debootstrap --arch=arm64 --variant=minbase \
            --include=python3,python3-venv,python3-pip,ca-certificates,procps,time \
            "$SUITE" "$ARM64_ROOT" "$MIRROR"
        touch "$ARM64_ROOT/.debootstrap-done"
    fi
    trap umount_pseudo EXIT
    mount_pseudo
    log "inside: $(in_root uname -m), $(in_root python3 --version)"
    if [ ! -e "$ARM64_ROOT/.venv-done" ]; then
        log "creating /opt/agent-venv and installing torch==$TORCH_VERSION (CPU) + the agent's dependencies"
        in_root python3 -m venv /opt/agent-venv
        in_root /opt/agent-venv/bin/pip install -q "torch==$TORCH_VERSION"
        in_root /opt/agent-venv/bin/pip install -q numpy "paho-mqtt>=2.1,<3" psutil typer rich \
            "pydantic>=2.6,<3" safetensors tokenizers
        touch "$ARM64_ROOT/.venv-done"
    fi
    in_root /opt/agent-venv/bin/python -c \
        'import platform, torch, numpy, tokenizers; print(platform.machine(), "torch", torch.__version__, "numpy", numpy.__version__)'
    log "rootfs ready: $ARM64_ROOT ($(du -shx "$ARM64_ROOT" 2>/dev/null | cut -f1))"
}

# Sourced by predict.sh for its functions (host_tools, mount_pseudo, umount_pseudo, in_root); run only when executed.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
