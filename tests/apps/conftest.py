"""The application tier: real ORMs and drivers through pgfleet, on real clusters (the session
cluster of tests/conftest.py and the pgfleet fixtures of tests/integration/conftest.py)."""

from tests.integration.conftest import empty_shards, make_fleet  # noqa: F401  (fixtures)
