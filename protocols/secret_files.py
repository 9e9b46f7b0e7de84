"""Secrets (join tokens) come from a file or an environment variable, never from the command line alone:
argv is visible to every user of the machine in `ps`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

MIN_TOKEN_BYTES = 16


def read_secret(path: Path | None, env_var: str, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The secret in ``path`` (surrounding whitespace stripped) or else in ``env_var``; None if neither is set.

    Raises ValueError, saying what to do, for an unreadable, group/world-readable or too short secret.
    """
    environ = os.environ if environ is None else environ
    if path is not None:
        try:
            mode = path.stat().st_mode
            data = path.read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the secret file {path}: {exc}") from None
        if mode & 0o077:
            raise ValueError(f"the secret file {path} is readable by other users; chmod 600 {path}")
        source = str(path)
    elif environ.get(env_var):
        data, source = environ[env_var].strip().encode("utf-8"), env_var
    else:
        return None
    if len(data) < MIN_TOKEN_BYTES:
        raise ValueError(f"the join token in {source} is {len(data)} bytes; use at least {MIN_TOKEN_BYTES} random "
                         "bytes, e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`")
    return data
