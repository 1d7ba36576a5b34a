"""PostgreSQL protocol v3, sans-IO: framing, the messages pgfleet inspects, and builders.

Nothing here touches a socket or an event loop. Parsers take bytes and return values (or
``None`` when more bytes are needed); builders take values and return bytes. Messages that
pgfleet only forwards are never decoded.
"""
