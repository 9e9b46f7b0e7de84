"""The run key `coordinator provision` writes beside the broker files: the coordinator signs every control message
with it and every device verifies against its public half (protocols/signing.py)."""

from __future__ import annotations

from pathlib import Path

from protocols.signing import load_private_key, public_path, write_key_pair

RUN_KEY_DIR = "run-key"  # its own 0700 directory: the private key never sits among the broker's files


def write_run_key(out: Path) -> Path:
    """``out/run-key/run-key`` (private, 0600) and ``run-key.pub``; an existing key is kept (devices already
    trust it), so provisioning again for more agents does not lock the others out. Returns the private key's path."""
    path = out / RUN_KEY_DIR / "run-key"
    if path.exists() and public_path(path).exists():
        load_private_key(path)  # fails loudly on a damaged or group-readable key
        return path
    write_key_pair(path)
    return path
