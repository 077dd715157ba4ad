"""The errors a user can fix from their command line, config or files.

`UserError` is what `main.py` prints as one line (and exits EXIT_USER) instead of a
traceback; everything else is a bug or a fault and keeps its traceback. Config errors
share one grammar: `config key <path>=<value>: <allowed>`.
"""

from typing import Any, NoReturn

EXIT_USER = 2  # the conventional status of a usage error
MISSING = object()  # the value of a required key that is absent


class UserError(Exception):
    """Bad input, named in the message with what is allowed; no traceback needed."""


class ConfigError(UserError, ValueError):
    """An invalid config value; the message names the key, the value and what is allowed."""


def fail(key: str, value: Any, allowed: str) -> NoReturn:
    shown = "<missing>" if value is MISSING else repr(value)
    raise ConfigError(f"config key {key}={shown}: {allowed}")


class DataError(UserError, ValueError):
    """A source document that cannot be read; the message names the file and where in it."""
