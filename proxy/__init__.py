"""pgfleet: one PostgreSQL endpoint in front of a fleet of PostgreSQL databases."""

__version__ = "0.1.0"
