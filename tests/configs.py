"""Building test configs: one way to lay a test's overrides over a base config dict."""

from __future__ import annotations

from typing import Any


def overridden(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``config`` with each top-level section of ``overrides`` merged into it (a dict section is
    updated key by key, anything else replaced)."""
    for name, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(name), dict):
            config[name] = {**config[name], **value}
        else:
            config[name] = value
    return config
