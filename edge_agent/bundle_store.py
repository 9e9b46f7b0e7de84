"""The device's bundle cache, keyed by content sha256, so a rejoin or restart never downloads twice.

A bundle is its tar plus optional parts (blobs only some trainer backends need: the torch backbone for torch; the
checkpoint and training/optimizer graphs for ORT); a part is stored inside its bundle's directory once its hash checks
out, so its presence means it is verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from export.locks import exclusive
from protocols.bundle_manifest import MANIFEST_NAME, BundleManifest, PartEntry
from protocols.durable import fsync_dir, write_atomic

_FILES_CHECKED = ("checkpoint", "training_model.onnx", "eval_model.onnx", "optimizer_model.onnx")


class BundleError(ValueError):
    """A fetched bundle is not what its manifest says; the message tells which file and what to do."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("HETEROTUNE_AGENT_CACHE", Path.home() / ".cache" / "heterotune-agent"))


class BundleStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def has(self, sha256: str) -> bool:
        return (self.path(sha256) / MANIFEST_NAME).exists()

    def manifest(self, sha256: str) -> BundleManifest:
        return BundleManifest.model_validate_json((self.path(sha256) / MANIFEST_NAME).read_text())

    def _lock(self, sha256: str) -> contextlib.AbstractContextManager[None]:
        """One installer of a bundle at a time, across processes: agents may share one cache directory."""
        return exclusive(self.root / f".{sha256}.lock")

    def install(self, sha256: str, archive: bytes) -> Path:
        """Verify and unpack a bundle tar; the directory appears atomically or not at all.

        Several agents sharing one cache may fetch the same bundle at once: each unpacks into its own staging
        directory under the bundle's lock, and whoever comes second finds the bundle installed and keeps it
        (one shared ``.partial`` directory used to be deleted by the second agent under the first's feet).
        """
        actual = hashlib.sha256(archive).hexdigest()
        if actual != sha256:
            raise BundleError(f"bundle archive hashes to {actual[:12]}, expected {sha256[:12]}; fetch it again")
        with self._lock(sha256):
            final = self.path(sha256)
            if self.has(sha256):
                return final
            work = Path(tempfile.mkdtemp(prefix=f".{sha256}.", suffix=".partial", dir=self.root))
            try:
                self._unpack(archive, work)
                shutil.rmtree(final, ignore_errors=True)  # a damaged earlier copy without its manifest
                work.rename(final)
                fsync_dir(self.root)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return final

    @staticmethod
    def _unpack(archive: bytes, work: Path) -> None:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
            for member in tar.getmembers():
                if not member.isfile() or "/" in member.name or member.name.startswith("."):
                    raise BundleError(f"bundle member '{member.name}' is not a plain top-level file; refusing it")
                source = tar.extractfile(member)
                assert source is not None
                _write_synced(work / member.name, source.read())
        manifest = BundleManifest.model_validate_json((work / MANIFEST_NAME).read_text())
        in_parts = {part.file for part in manifest.parts.values()}
        for name in _FILES_CHECKED:
            if name in in_parts and name not in manifest.files:
                continue  # a part (e.g. the ORT checkpoint): verified by install_part when this backend fetches it
            path = work / name
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
            if manifest.files.get(name) != digest:
                raise BundleError(f"bundle file '{name}' is {digest if digest == 'missing' else 'damaged'}: it does "
                                  "not match its manifest hash; the bundle is damaged, fetch it again")
        fsync_dir(work)

    def has_part(self, sha256: str, part: PartEntry) -> bool:
        """Whether a bundle's part was fetched and verified (it is written under its name only after that)."""
        path = self.path(sha256) / part.file
        return path.exists() and path.stat().st_size == part.size

    def install_part(self, sha256: str, part: PartEntry, data: bytes) -> Path:
        """Verify a fetched part against the bundle manifest's hash and store it beside the bundle's files."""
        if not self.has(sha256):
            raise BundleError(f"bundle {sha256[:12]} is not installed; install it before its parts")
        actual = hashlib.sha256(data).hexdigest()
        if actual != part.sha256 or len(data) != part.size:
            raise BundleError(f"bundle part '{part.file}' hashes to {actual[:12]} ({len(data)} bytes), the manifest "
                              f"says {part.sha256[:12]} ({part.size} bytes); fetch it again")
        final = self.path(sha256) / part.file
        with self._lock(sha256):
            write_atomic(final, data)
        return final


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())

