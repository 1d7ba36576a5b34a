"""Backend side: raw PostgreSQL connections and per-database pools (asyncio)."""
