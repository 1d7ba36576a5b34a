"""Operating pgfleet: the admin console, the HTTP endpoints and metrics, the audit log (asyncio)."""
