"""Errors that the CLI shows to a user as one readable message instead of a traceback."""

import errno
from contextlib import contextmanager


class SemrouteError(Exception):
    """A known, user-facing failure: bad input, a mismatched cache, a missing file.

    The message says what was received, what was expected and, where there is one, the fix. The CLI
    prints it without a traceback (set ``SEMROUTE_TRACEBACK=1`` to see one).
    """


class ManifestError(SemrouteError):
    """A data manifest record that cannot be used; the message names the file and line."""


class FingerprintMismatch(SemrouteError):
    """A cache whose fingerprint does not fit the run that wants to use it."""


class CacheDamaged(SemrouteError):
    """Bytes of a cache that fail a checksum, are missing or do not decode; the message names the store, the
    file (array, chunk or shard) and the command that lists all damage (``semroute verify``)."""


# Errors that only a write meets: the file-size limit, a full disk or quota, a read-only file system.
WRITE_ERRNOS = {errno.EFBIG, errno.ENOSPC, errno.EDQUOT, errno.EROFS}


# Errors of a path the user gave: in the way, not there, not allowed, too long (and the write-only ones).
PATH_ERRNOS = {errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.EACCES, errno.EPERM,
               errno.ENAMETOOLONG} | WRITE_ERRNOS


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an error's text, cut at ``limit`` characters ("" when it has none): what a one-line message
    quotes of a library's own (often multi-line) error."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else ""


def describe_path_error(err: OSError) -> str | None:
    """One line for an OSError about a named path (``PATH_ERRNOS``), else None (an unexpected failure)."""
    if err.errno not in PATH_ERRNOS or not err.filename:
        return None
    where = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 else "")
    hint = {errno.EEXIST: "a file is in the way of a folder this command creates",
            errno.ENOTDIR: "a file is in the way: a folder was expected there"}.get(err.errno)
    return f"{where}: {err.strerror}" + (f" ({hint})" if hint else "")


@contextmanager
def write_faults_named(target, then: str):
    """Turn a failed write under ``target`` into one message naming the file (or ``target``) and saying
    ``then`` (how to go on: what was finished is kept). Other OSErrors pass unchanged."""
    try:
        yield
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        raise SemrouteError(f"writing {err.filename or target} failed: {err.strerror or err}; {then}") from None
