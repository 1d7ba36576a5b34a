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
        super().__init__(PROTOCOL_VIOLATION, message)


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
        super().__init__(INTERNAL_ERROR, message)


# The SQLSTATEs pgfleet uses, named as PostgreSQL's errcodes.txt names them (its last column,
# upper case), by code and grouped by class. Code outside this module spells them by these
# names, never as literals (tests/unit/test_sourcecode.py holds that).
# Class 01 - warning
WARNING = "01000"
# Class 08 - connection exception
CONNECTION_EXCEPTION = "08000"
CONNECTION_FAILURE = "08006"
TRANSACTION_RESOLUTION_UNKNOWN = "08007"
PROTOCOL_VIOLATION = "08P01"
# Class 0A - feature not supported
FEATURE_NOT_SUPPORTED = "0A000"
# Class 22 - data exception
NUMERIC_VALUE_OUT_OF_RANGE = "22003"
INVALID_ROW_COUNT_IN_LIMIT_CLAUSE = "2201W"
INVALID_ROW_COUNT_IN_RESULT_OFFSET_CLAUSE = "2201X"
CHARACTER_NOT_IN_REPERTOIRE = "22021"
INVALID_PARAMETER_VALUE = "22023"
INVALID_TEXT_REPRESENTATION = "22P02"
INVALID_BINARY_REPRESENTATION = "22P03"
BAD_COPY_FILE_FORMAT = "22P04"
# Class 23 - integrity constraint violation
NOT_NULL_VIOLATION = "23502"
UNIQUE_VIOLATION = "23505"
# Class 25 - invalid transaction state
READ_ONLY_SQL_TRANSACTION = "25006"
IN_FAILED_SQL_TRANSACTION = "25P02"
# Class 26 - invalid SQL statement name
INVALID_SQL_STATEMENT_NAME = "26000"
# Class 28 - invalid authorization specification
INVALID_AUTHORIZATION_SPECIFICATION = "28000"
INVALID_PASSWORD = "28P01"
# Class 34 - invalid cursor name
INVALID_CURSOR_NAME = "34000"
# Class 3D - invalid catalog name
INVALID_CATALOG_NAME = "3D000"
# Class 40 - transaction rollback
SERIALIZATION_FAILURE = "40001"
STATEMENT_COMPLETION_UNKNOWN = "40003"
# Class 42 - syntax error or access rule violation
INSUFFICIENT_PRIVILEGE = "42501"
SYNTAX_ERROR = "42601"
UNDEFINED_OBJECT = "42704"
DATATYPE_MISMATCH = "42804"
UNDEFINED_TABLE = "42P01"
DUPLICATE_DATABASE = "42P04"
DUPLICATE_PREPARED_STATEMENT = "42P05"
INVALID_NAME = "42602"
# Class 53 - insufficient resources
TOO_MANY_CONNECTIONS = "53300"
# Class 55 - object not in prerequisite state
OBJECT_NOT_IN_PREREQUISITE_STATE = "55000"
# Class 57 - operator intervention
QUERY_CANCELED = "57014"
ADMIN_SHUTDOWN = "57P01"
# Class F0 - configuration file error
CONFIG_FILE_ERROR = "F0000"
# Class XX - internal error
INTERNAL_ERROR = "XX000"

# The error every client gets when pgfleet stops (SIGTERM, or its last transaction ended).
SHUTTING_DOWN = ProxyError(ADMIN_SHUTDOWN, "terminating connection because pgfleet is shutting down",
                           hint="reconnect in a moment")
