"""The exception types loraserve raises for problems a user or plugin author can fix.

Every message says what was wrong and what to change. Each ``UserError`` class names the HTTP
status the frontends answer it with (``http_status``: 400, or 403, 404, 409, 413, 429 for the subclasses
below); anything else is a bug.
"""

from __future__ import annotations


class LoraserveError(Exception):
    """Base class for every loraserve error."""


class UserError(LoraserveError):
    """The caller's input was wrong; the message says what to change."""

    http_status = 400


class ConfigError(UserError):
    """A flag, environment variable or combination of them is invalid."""


class NotSupportedYet(ConfigError):
    """A flag names a feature that has not landed yet."""


class PluginError(LoraserveError):
    """A plugin is broken or conflicts with another plugin."""


class Forbidden(UserError):
    """The operator's settings forbid this (the message names the flag); HTTP answers 403."""

    http_status = 403


class NotFound(UserError):
    """The request names something that does not exist, such as an unknown adapter; HTTP answers 404."""

    http_status = 404


class Conflict(UserError):
    """The request conflicts with the server's state (a name already loaded, no slot to pin); HTTP answers 409."""

    http_status = 409


class TooLarge(UserError):
    """The input is larger than a bound the operator set (a flag names it); HTTP answers 413."""

    http_status = 413


class QueueFull(UserError):
    """The engine's waiting queue is at ``--max-queued-requests``; HTTP answers 429 with Retry-After."""

    http_status = 429
