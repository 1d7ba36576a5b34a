"""The tenant directory: tenants' databases found by name in a registry at run time, each
with a pool opened on first use and closed when idle (directory.py; the registry and its
crypto in registry.py)."""
