"""Errors a user can act on. The CLI prints their message and exits non-zero, no traceback."""


class MixrayError(Exception):
    """Base class: the message says what was received and what is allowed."""


class ConfigError(MixrayError):
    """The config (or an override) is invalid; the message names the key."""


class InputError(MixrayError):
    """An input file, model or run-directory artifact is missing or unusable."""
