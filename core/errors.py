"""The exception types loraserve raises for problems a user or plugin author can fix.

Every message says what was wrong and what to change. The HTTP frontends map ``UserError``
subclasses to 4xx responses; anything else is a bug.
"""

from __future__ import annotations


class LoraserveError(Exception):
    """Base class for every loraserve error."""


class UserError(LoraserveError):
    """The caller's input was wrong; the message says what to change."""


class ConfigError(UserError):
    """A flag, environment variable or combination of them is invalid."""


class NotSupportedYet(ConfigError):
    """A flag names a feature that has not landed yet."""


class PluginError(LoraserveError):
    """A plugin is broken or conflicts with another plugin."""
