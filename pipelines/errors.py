"""The errors a user can act on: each is reported as one clear message (exit code 2), never a traceback."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: reported as one clear message (exit code 2), never a traceback."""


class NotFound(UserError, LookupError):
    """A run, artifact or model named by the user does not exist."""


class ConfigError(UserError):
    """A setting is invalid; the message names it and says what to do."""
