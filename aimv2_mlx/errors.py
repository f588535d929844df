"""The domain errors: one base, so a caller (and the `aimv2` CLI) tells a user's mistake or an
unusable file from a bug in the library.

Every error a user can cause is an `Aimv2Error` whose message names the file or setting and
the reason ("file: reason"). Each class also keeps the builtin base it had (ValueError,
FileNotFoundError, ...), so code that caught those still does.
"""

from __future__ import annotations


class Aimv2Error(Exception):
    """A user's mistake or an unusable input, not a bug; the message says which and why."""


class SettingError(Aimv2Error, ValueError):
    """A setting that cannot work: an option, an argument, a config value or a combination."""


class UnusableFileError(Aimv2Error, ValueError):
    """A file or folder that is not what it must be (unreadable, wrong format, inconsistent)."""
