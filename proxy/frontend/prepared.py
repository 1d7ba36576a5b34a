"""A client's prepared statements: the named ones and the unnamed one, as one kind of object.

Owns ``PreparedStatements``: what the client prepared (Parse), where each runs, and how each
gets onto whichever backend runs it. A named statement goes to backends under pgfleet's
shared name (``pgfleet_N``, one per distinct text and parameter types across the fleet), so a
backend that already prepared that text for anyone serves it without a new Parse. The
unnamed statement keeps its empty name and is re-sent as the client sent it; a backend
carries the fleet-wide token of the unnamed statement it holds (``unnamed_owner``), so it is
re-sent only when another client's replaced it. Neither ever forgets a backend's statements:
those are shared, and stay prepared for the next client.
"""

from __future__ import annotations

from ..backend.connection import ServerConnection
from ..backend.expect import Answer, Expect, Fate
from ..errors import DUPLICATE_PREPARED_STATEMENT, INVALID_SQL_STATEMENT_NAME, ClientError
from ..router.route import Analysis
from ..wire import messages as m

# The answer to a Parse pgfleet re-sends before a client's Bind or Describe: swallowed.
DROP_PARSE = Expect(Answer.PARSE, Fate.DROP)


class Prepared:
    """One prepared statement of a client.

    ``control`` is the first word of a statement that is only BEGIN, COMMIT, ... (pgfleet
    runs those itself where it can: see the session's ``_bind``); ``routed`` marks a
    statement whose shard key is a parameter (each Bind picks its database); ``effect`` is
    its analysis when running it changes session settings or pins the backend.
    """

    __slots__ = (
        "_param_types",
        "_query",
        "backend_name",
        "control",
        "database",
        "effect",
        "parse",
        "routed",
        "token",
        "wire_name",
    )

    def __init__(self, parse: bytes, database: str, backend_name: str = "", query: str | None = None,
                 param_types: bytes = b"", effect: Analysis | None = None, routed: bool = False,
                 control: str | None = None, token: int = 0) -> None:
        self.parse = parse  # the Parse message a backend gets (the unnamed one's: as the client sent it)
        self.database = database  # where its route put it at Parse
        self.backend_name = backend_name  # "" for the unnamed statement
        self.wire_name = backend_name.encode() + b"\0"  # as it goes into a Bind
        self._query = query
        self._param_types = param_types if query is not None else None
        self.effect = effect
        self.routed = routed
        self.control = control
        self.token = token  # the unnamed statement's fleet-wide number (see ``unnamed_owner``)

    @classmethod
    def named(cls, backend_name: str, query: str, param_types: bytes, database: str,
              effect: Analysis | None, *, routed: bool = False, control: str | None = None) -> Prepared:
        return cls(m.parse(backend_name, query, param_types), database, backend_name=backend_name,
                   query=query, param_types=param_types, effect=effect, routed=routed, control=control)

    @classmethod
    def forwarded(cls, parse: bytes, database: str, token: int) -> Prepared:
        """The unnamed statement as the hot path forwards it: not decoded, no effect. (It runs
        once per statement, so it sets the slots itself rather than through ``__init__``.)"""
        self = cls.__new__(cls)
        self.parse = parse
        self.database = database
        self.backend_name = ""
        self.wire_name = b"\0"
        self._query = self._param_types = None
        self.effect = self.control = None
        self.routed = False
        self.token = token
        return self

    @property
    def unnamed(self) -> bool:
        return not self.backend_name

    @property
    def query(self) -> str:
        """Its text (decoded only when asked: the unnamed statement is forwarded as it came)."""
        if self._query is None:
            self._decode()
        assert self._query is not None
        return self._query

    @property
    def param_types(self) -> bytes:
        """Its Parse's parameter types, as they came (count and OIDs)."""
        if self._param_types is None:
            self._decode()
        assert self._param_types is not None
        return self._param_types

    def _decode(self) -> None:
        parse = m.decode_parse(self.parse[5:])
        self._query, self._param_types = parse.query, parse.param_types

    def prepare_on(self, backend: ServerConnection) -> None:
        """Make sure ``backend`` holds this statement: send its Parse (answer dropped) if not."""
        if self.backend_name:
            if self.backend_name not in backend.prepared:
                backend.close_stale(self.backend_name)
                backend.prepared.add(self.backend_name)
                backend.push(Expect(Answer.PARSE, Fate.DROP, statement=self.backend_name))
                backend.send(self.parse)
        elif backend.unnamed_owner != self.token:
            backend.unnamed_owner = self.token
            backend.push(DROP_PARSE)
            backend.send(self.parse)


class PreparedStatements:
    """The client's statements by the name it gave them (``b""``: the unnamed one)."""

    __slots__ = ("named", "unnamed")

    def __init__(self) -> None:
        self.named: dict[bytes, Prepared] = {}
        self.unnamed: Prepared | None = None

    def get(self, name: bytes) -> Prepared | None:
        return self.named.get(name) if name else self.unnamed

    def find(self, name: bytes) -> Prepared:
        """The statement a Bind or Describe names; 26000 as PostgreSQL says it when missing."""
        found = self.named.get(name) if name else self.unnamed
        if found is None:
            if not name:
                raise ClientError(INVALID_SQL_STATEMENT_NAME, "unnamed prepared statement does not exist",
                                  hint="send Parse before Bind")
            raise ClientError(INVALID_SQL_STATEMENT_NAME,
                              f'prepared statement "{name.decode(errors="replace")}" does not exist',
                              hint="send Parse for it first")
        return found

    def check_new(self, name: bytes) -> None:
        """A Parse may not reuse a named statement's name (the unnamed one is replaced)."""
        if name and name in self.named:
            raise ClientError(DUPLICATE_PREPARED_STATEMENT,
                              f'prepared statement "{name.decode(errors="replace")}" already exists',
                              hint="Close it first, or use another name")

    def add(self, name: bytes, prepared: Prepared) -> None:
        if name:
            self.named[name] = prepared
        else:
            self.unnamed = prepared

    def close(self, name: bytes) -> None:
        """The client's name goes; backend-side statements are shared and stay prepared."""
        if name:
            self.named.pop(name, None)
        else:
            self.unnamed = None

    def control(self, name: bytes) -> Prepared | None:
        """The statement of that name if it is BEGIN, COMMIT, ... (see ``Prepared.control``)."""
        found = self.named.get(name) if name else self.unnamed
        return found if found is not None and found.control is not None else None
