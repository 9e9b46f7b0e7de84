"""Secrets (MQTT passwords, join tokens) from files or the environment, never only from the command line: argv is
visible to every user of the machine in `ps`. A secret file must be a regular file only its owner can read."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

PASSWORD_ENV = "HETEROTUNE_MQTT_PASSWORD"
JOIN_TOKEN_ENV = "HETEROTUNE_JOIN_TOKEN"
MAX_SECRET_BYTES = 4096
MIN_TOKEN_BYTES = 16


class CredentialError(ValueError):
    """A password file that cannot be used; the message says what to fix."""


def read_private_file(path: Path, what: str) -> bytes:
    """The bytes of a secret file, refused when others may read or write it (a leaked device password or join
    token lets anyone act as that device) or when it is not a small regular file."""
    try:
        info = path.stat()
    except OSError as exc:
        raise CredentialError(f"cannot read the {what} file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise CredentialError(f"the {what} file {path} is not a regular file")
    if info.st_mode & 0o077:
        raise CredentialError(f"the {what} file {path} is readable or writable by others (mode "
                              f"{stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {path}")
    if info.st_size > MAX_SECRET_BYTES:
        raise CredentialError(f"the {what} file {path} is {info.st_size} bytes; expected one line")
    return path.read_bytes()


def read_password_file(path: Path) -> str:
    """The first line of ``path`` (as `coordinator provision` writes it: one line, mode 0600)."""
    lines = read_private_file(path, "password").decode("utf-8", errors="strict").splitlines()
    password = lines[0].strip() if lines else ""
    if not password:
        raise CredentialError(f"the password file {path} is empty; `coordinator provision` writes one per party")
    return password


def resolve_password(password: str | None, password_file: Path | None) -> str | None:
    """The password from --password-file, else from --password / the environment; both at once is an error."""
    if password_file is not None:
        if password is not None and os.environ.get(PASSWORD_ENV) != password:
            raise CredentialError("give either --password-file or a password, not both")
        return read_password_file(password_file)
    return password


def password_on_command_line(password: str | None) -> bool:
    """True if a password came from argv rather than the environment (worth a warning: `ps` shows it)."""
    return password is not None and os.environ.get(PASSWORD_ENV) != password


def read_secret(path: Path | None, env_var: str = JOIN_TOKEN_ENV,
                environ: Mapping[str, str] | None = None) -> bytes | None:
    """A join token from ``path`` (surrounding whitespace stripped) or else from ``env_var``; None if neither is set.

    Raises CredentialError, saying what to do, for an unreadable, shared or too short secret."""
    environ = os.environ if environ is None else environ
    if path is not None:
        data, source = read_private_file(path, "secret").strip(), str(path)
    elif environ.get(env_var):
        data, source = environ[env_var].strip().encode("utf-8"), env_var
    else:
        return None
    if len(data) < MIN_TOKEN_BYTES:
        raise CredentialError(f"the join token in {source} is {len(data)} bytes; use at least {MIN_TOKEN_BYTES} "
                              "random bytes, e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`")
    return data
