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
