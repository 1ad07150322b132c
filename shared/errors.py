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
