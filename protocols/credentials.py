"""MQTT secrets from files or the environment, never only from the command line (argv is visible to every user
of the machine in `ps`)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

PASSWORD_ENV = "HETEROTUNE_MQTT_PASSWORD"
MAX_PASSWORD_BYTES = 4096


class CredentialError(ValueError):
    """A password file that cannot be used; the message says what to fix."""


def read_password_file(path: Path) -> str:
    """The first line of ``path`` (as `coordinator provision` writes it: one line, mode 0600).

    Refuses a file that others may read or write: a leaked device password lets anyone act as that device."""
    try:
        info = path.stat()
    except OSError as exc:
        raise CredentialError(f"cannot read the password file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise CredentialError(f"the password file {path} is not a regular file")
    if info.st_mode & 0o077:
        raise CredentialError(f"the password file {path} is readable or writable by others (mode "
                              f"{stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {path}")
    if info.st_size > MAX_PASSWORD_BYTES:
        raise CredentialError(f"the password file {path} is {info.st_size} bytes; expected one line")
    lines = path.read_text(encoding="utf-8", errors="strict").splitlines()
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
