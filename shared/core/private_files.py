"""Files only this user may read: the data directory, the secrets kept in it
(``secret_key`` signs file URLs, ``dev_api_key``) and the SQLite database.

New ones are private from their first byte (created with their mode, so no
moment exists when another user could read them, whatever the umask). Ones an
older install left readable by group or others are tightened on start, with a
warning naming the path and its old mode (never its content).
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

FILE_MODE = 0o600
DIR_MODE = 0o700
# What "private" forbids: any permission of group or others.
_OTHERS = 0o077


def private_dir(path: Path) -> None:
    """Make ``path`` (and missing parents, with the usual modes) a directory only
    this user can enter; an existing one open to others is tightened."""
    try:
        path.mkdir(mode=DIR_MODE, parents=True)
    except FileExistsError:
        tighten(path)
    else:
        # mkdir's mode passed through the umask, which can only have taken bits away;
        # an odd umask (0o200) must not leave the owner without access either.
        os.chmod(path, DIR_MODE)


def read_private_file(path: Path, make: Callable[[], str]) -> str:
    """The text of the private file ``path``: made with ``make()`` where it does not
    exist, tightened where an older install left it readable by others."""
    if path.exists():
        tighten(path)
    else:
        write_private_file(path, make())
    return path.read_text().strip()


def write_private_file(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text``, mode 0600, unless it exists (another
    process made it first: the caller reads that one). Returns whether this call
    wrote it. Readers never see it partly written: the text goes to a temporary
    file of the same directory, itself created 0600 (O_EXCL), then linked into
    place."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = _create(tmp)
    try:
        try:
            data = text.encode()
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # A link, not a rename: it fails where the file exists, so two processes
            # starting together agree on one secret.
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def create_private_file(path: Path) -> None:
    """Create ``path`` empty, mode 0600, where it does not exist (a SQLite database
    file before SQLite opens it: SQLite gives its -wal and -shm files the mode of
    the database file)."""
    try:
        os.close(_create(path))
    except FileExistsError:
        return


def _create(path: Path) -> int:
    """A new file's descriptor, mode 0600 whatever the umask (FileExistsError if
    ``path`` exists)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # the umask may have taken the owner's bits
    except BaseException:
        os.close(fd)
        raise
    return fd


def tighten(path: Path) -> None:
    """Take group's and others' permissions off ``path`` where it has any, with a
    warning: an install from before these files were made private."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    if not mode & _OTHERS:
        return
    tight = mode & ~_OTHERS
    try:
        os.chmod(path, tight)
    except OSError as exc:
        log.warning(
            "%s is readable by other users (mode %s) and could not be made private: %s",
            path,
            oct(mode),
            exc.strerror,
        )
        return
    log.warning("%s was readable by other users (mode %s): now %s", path, oct(mode), oct(tight))


def tighten_sqlite(database: Path) -> None:
    """The database file, made private (created 0600 where it is new), and its
    -wal and -shm files where they exist."""
    if database.parent.is_dir():  # else SQLite itself says what is missing
        create_private_file(database)
    for suffix in ("", "-wal", "-shm", "-journal"):
        tighten(database.with_name(database.name + suffix))
