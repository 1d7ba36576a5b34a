"""The one way errors travel in pgfleet.

Every error pgfleet raises is a ``ProxyError`` carrying a real SQLSTATE, a one-line message
that says what happened and what to do, and an optional hint. Only the frontend turns these
into ``ErrorResponse`` messages; nothing else formats errors. The families say whose fault it
was: the client's (``ClientError``), a backend's (``BackendError``), the configuration's
(``ConfigError``), or our own (``InternalError``).
"""

from __future__ import annotations


class ProxyError(Exception):
    """An error with a SQLSTATE, reported to the client as an ErrorResponse."""

    severity = "ERROR"

    def __init__(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.sqlstate} {self.message}"


class ClientError(ProxyError):
    """The client sent something we refuse (bad SQL shape, forbidden route, bad auth)."""


class ProtocolViolation(ClientError):
    """The client broke the wire protocol; the connection is closed after the error."""

    severity = "FATAL"

    def __init__(self, message: str) -> None:
        super().__init__("08P01", message)


class AuthFailed(ClientError):
    severity = "FATAL"


class BackendError(ProxyError):
    """A backend database failed: unreachable, died, or refused our credentials."""


class ConfigError(Exception):
    """A configuration problem, reported as ``path: reason`` and never as a traceback."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


class InternalError(ProxyError):
    """Our own bug, reported to the client without a traceback and logged with one."""

    def __init__(self, message: str) -> None:
        super().__init__("XX000", message)


# SQLSTATEs used across the code base, named as PostgreSQL's errcodes.txt names them.
PROTOCOL_VIOLATION = "08P01"
CONNECTION_FAILURE = "08006"
CONNECTION_EXCEPTION = "08000"
INVALID_PASSWORD = "28P01"
INVALID_AUTHORIZATION = "28000"
INVALID_CATALOG_NAME = "3D000"
INSUFFICIENT_PRIVILEGE = "42501"
READ_ONLY_SQL_TRANSACTION = "25006"
IN_FAILED_SQL_TRANSACTION = "25P02"
FEATURE_NOT_SUPPORTED = "0A000"
TOO_MANY_CONNECTIONS = "53300"
SYNTAX_ERROR = "42601"
ADMIN_SHUTDOWN = "57P01"
QUERY_CANCELED = "57014"
INVALID_PARAMETER_VALUE = "22023"
