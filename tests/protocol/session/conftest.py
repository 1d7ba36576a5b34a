"""The session tier: every test here runs with sockets forbidden (the harness scripts the
servers and the client's transport; see harness.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.protocol.session.harness import forbid_sockets


@pytest.fixture(autouse=True)
async def no_sockets() -> AsyncIterator[None]:
    async with forbid_sockets() as attempts:
        yield
    assert not attempts, f"sockets were used: {attempts}"
