"""Routing: statement text -> ``Route`` values. Pure: no I/O, no event loop."""
