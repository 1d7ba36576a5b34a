"""Client side: the session state machine; the only place errors become ErrorResponse."""
