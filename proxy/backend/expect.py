"""What each message sent to a backend will be answered with, and what to do with the answer.

A ``ServerConnection`` keeps a queue of ``Expect`` entries, one per message it sent that the
backend answers, in order. Most answers are forwarded; the answers to messages pgfleet
injected (a lazy re-Parse, replayed session settings, a refusal) are dropped or replaced, and
the answers to messages pgfleet did not need to send (a Parse the backend already has) are
made up, in the same place in the stream. Pure values; no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Answer(enum.Enum):
    PARSE = "parse"           # ParseComplete
    BIND = "bind"             # BindComplete
    DESCRIBE_STATEMENT = "ds"  # ParameterDescription, then RowDescription or NoData
    DESCRIBE_PORTAL = "dp"    # RowDescription or NoData
    EXECUTE = "execute"       # DataRow* then CommandComplete / EmptyQuery / PortalSuspended
    CLOSE = "close"           # CloseComplete
    SYNC = "sync"             # ReadyForQuery
    QUERY = "query"           # everything up to and including ReadyForQuery


class Fate(enum.Enum):
    FORWARD = "forward"   # the client asked for it: pass the answer on
    DROP = "drop"         # pgfleet injected it: swallow the answer
    MADE_UP = "made_up"   # never sent: emit ``reply`` when its turn comes
    REFUSE = "refuse"     # an injected failing statement: replace its error with ``reply``
    CUT = "cut"           # pgfleet's Sync ending one database's part of a pipeline: swallowed,
                          # and the link is told (``part_answered``; frontend/split.py)


@dataclass(frozen=True, slots=True)
class Expect:
    answer: Answer
    fate: Fate = Fate.FORWARD
    statement: str | None = None  # the backend-side name a Parse prepares
    reply: bytes = b""
    client: bytes = b""  # the client's own name for it, when it is the client's Parse


# Shared instances for the common cases, so that the hot path allocates nothing.
FORWARD_BIND = Expect(Answer.BIND)
FORWARD_EXECUTE = Expect(Answer.EXECUTE)
FORWARD_DESCRIBE_PORTAL = Expect(Answer.DESCRIBE_PORTAL)
FORWARD_DESCRIBE_STATEMENT = Expect(Answer.DESCRIBE_STATEMENT)
FORWARD_CLOSE = Expect(Answer.CLOSE)
FORWARD_SYNC = Expect(Answer.SYNC)
DROP_SYNC = Expect(Answer.SYNC, Fate.DROP)
CUT_SYNC = Expect(Answer.SYNC, Fate.CUT)  # a pipeline cut by pgfleet between databases
FORWARD_QUERY = Expect(Answer.QUERY)
FORWARD_PARSE_UNNAMED = Expect(Answer.PARSE)
DROP_QUERY = Expect(Answer.QUERY, Fate.DROP)
# pgfleet.tenant set for a database key: dropped like DROP_QUERY, but if it fails the
# backend is closed at once, before anything sent after it is answered (it would run as the
# backend's previous tenant).
TENANT_QUERY = Expect(Answer.QUERY, Fate.DROP, statement="pgfleet.tenant")
# The BEGIN pgfleet sends inside a client's pipeline outside a transaction block that reached a
# second database (Session._implicit_across): dropped like DROP_QUERY; if the server skipped it
# (an error came first), the backend notes it (``skipped_begin``): that part failed.
IMPLICIT_BEGIN = Expect(Answer.QUERY, Fate.DROP, statement="pgfleet.begin")
