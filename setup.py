"""Only the optional C extensions live here; everything else is in pyproject.toml.

``proxy.router._hash`` is PostgreSQL's partition hash in C, ``proxy.wire._datarow`` the split
of a DataRow into its values (see their headers). Both are optional: where no compiler is
found the build goes on and the Python code next to them does the same work, only slower.
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("proxy.router._hash", ["proxy/router/_hash.c"], optional=True),
    Extension("proxy.wire._datarow", ["proxy/wire/_datarow.c"], optional=True),
])
