"""Verified chunks of an unfinished blob download, kept on disk so a cut link or a restart resumes.

Why on disk and not only in memory: a device on a bad link may lose its connection or be restarted
(power, OOM, update) in the middle of a 70 MB bundle; without a spool every attempt starts from byte
zero and a link that cuts more often than a full download takes never finishes. Each chunk is stored as
its own self-describing frame (``protocols.chunks.encode_chunk``), so its sha256 travels with it and is
checked again when it is reused: a file damaged at rest is dropped and fetched again, never trusted. The
whole blob is still verified against the manifest's sha256 after assembly.

Layout: ``<root>/<blob sha256>/<index>.chunk``, written atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from protocols.chunks import BlobRef, Chunk, decode_chunk, encode_chunk
from protocols.errors import ChunkError
from protocols.topics import validate_sha256

log = logging.getLogger(__name__)


class ChunkSpool:
    """Per-blob directories of verified chunk frames under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, sha256: str) -> Path:
        return self.root / validate_sha256(sha256)

    def save(self, chunk: Chunk) -> None:
        """Store one verified chunk; a failed write only costs a later re-download, so it is logged, not raised."""
        folder = self._dir(chunk.blob_sha)
        final = folder / f"{chunk.index}.chunk"
        work = folder / f".{chunk.index}.chunk.tmp"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(work, "wb") as handle:
                handle.write(encode_chunk(chunk))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(work, final)
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            log.warning("could not keep chunk %d of blob %s for a resume: %s", chunk.index, chunk.blob_sha[:12], exc)

    def load(self, ref: BlobRef) -> list[Chunk]:
        """The chunks of ``ref`` kept so far; each is re-verified and a damaged or foreign file is deleted."""
        folder = self._dir(ref.sha256)
        if not folder.is_dir():
            return []
        chunks: list[Chunk] = []
        for path in sorted(folder.glob("*.chunk")):
            try:
                chunk = decode_chunk(path.read_bytes())
                expected = int(path.stem)
                if (chunk.blob_sha, chunk.count, chunk.blob_size, chunk.index) != (
                    ref.sha256, ref.chunks, ref.size, expected
                ):
                    raise ChunkError(f"frame is chunk {chunk.index} of {chunk.blob_sha[:12]}, not the file's")
            except (OSError, ValueError, ChunkError) as exc:
                log.warning("dropping kept chunk %s (it will be fetched again): %s", path, exc)
                path.unlink(missing_ok=True)
                continue
            chunks.append(chunk)
        return chunks

    def discard(self, sha256: str) -> None:
        """Forget a blob's chunks (after it was assembled and verified, or when they proved wrong)."""
        shutil.rmtree(self._dir(sha256), ignore_errors=True)
