"""Errors that the CLI shows to a user as one readable message instead of a traceback."""


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
