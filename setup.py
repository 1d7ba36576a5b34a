"""Only the optional C extension lives here; everything else is in pyproject.toml.

``proxy.router._hash`` is PostgreSQL's partition hash in C (see its header). It is
optional: where no compiler is found the build goes on and ``proxy.router.shard`` uses its
Python code, which gives the same shards, only slower.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("proxy.router._hash", ["proxy/router/_hash.c"], optional=True)])
