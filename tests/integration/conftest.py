"""pgfleet fixtures: one pgfleet process per test module, in front of the session's cluster.

``Fleet`` starts ``python -m proxy run`` on a free port with a config written under
``tmp_path``, waits until it accepts, and stops it at the end (checking it exited cleanly).
Helpers give the DSN for a key, run psql/pgbench against it, and read the log. The backends
are the real cluster from ``tests/conftest.py``; nothing here mocks PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.embedded import Cluster, free_port

ROOT = Path(__file__).resolve().parents[2]

# One key of each role; secrets are plain (pgfleet hashes them at load).
KEYS = {
    "pf_admin": ("admin-secret", "admin"),
    "pf_server": ("server-secret", "server"),
    "pf_client": ("client-secret", "client"),
    "pf_tenant": ("tenant-secret", "database"),
}


class Fleet:
    """A running pgfleet process."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.config = config
        self.port = config["listen"]["port"]
        self.workdir = workdir
        self.config_path = workdir / "pgfleet.yaml"
        self.log_path = workdir / "pgfleet.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Fleet:
        self.config_path.write_text(yaml.safe_dump(self.config))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(self.config_path),
                                          "--log-level", "debug"], stdout=log, stderr=log, env=env, cwd=ROOT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgfleet exited early: {self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"pgfleet did not start listening: {self.log()}")

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def dsn(self, key: str = "pf_server", database: str = "app", secret: str | None = None, **extra: str) -> str:
        secret = KEYS[key][0] if secret is None else secret
        query = "&".join(f"{k}={v}" for k, v in extra.items())
        return f"postgresql://{key}:{secret}@127.0.0.1:{self.port}/{database}" + (f"?{query}" if query else "")

    def kw(self, key: str = "pf_server", database: str = "app") -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.port, "user": key, "password": KEYS[key][0],
                "dbname": database}

    def psql(self, sql: str, key: str = "pf_server", database: str = "app", *args: str,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", self.dsn(key, database), *args,
                               "-c", sql], capture_output=True, text=True, timeout=60, check=check)


def fleet_config(pg: Cluster, **overrides: Any) -> dict[str, Any]:
    """A three-database fleet on the session cluster: primary=bank, secondary, analytics."""
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": free_port(), "database": "app"},
        "pool": {"mode": "transaction", "size": 10, "acquire_timeout": "3s"},
        "databases": {
            "primary": {"dsn": pg.dsn("bank", user="pf_scram", password="scrampass")},
            "secondary": {"dsn": pg.dsn("secondary", user="pf_md5", password="md5pass")},
            "analytics": {"dsn": pg.dsn("analytics", user="pf_trust")},
        },
        "default_database": "primary",
        "tables": {"events": "analytics", "user_activity": "analytics"},
        "shutdown_timeout": "5s",
        "keys": [{"id": key, "secret": secret, "role": role, **({"user_id": 42} if role == "database" else {})}
                 for key, (secret, role) in KEYS.items()],
    }
    for name, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(name), dict):
            config[name] = {**config[name], **value}
        else:
            config[name] = value
    return config


@pytest.fixture(scope="module")
def fleet(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The standard three-database fleet, one pgfleet process for the module."""
    proc = Fleet(fleet_config(pg), tmp_path_factory.mktemp("fleet")).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def make_fleet(pg: Cluster, tmp_path: Path) -> Iterator[Any]:
    """Start a pgfleet with config overrides, for tests that need their own settings."""
    started: list[Fleet] = []

    def make(**overrides: Any) -> Fleet:
        proc = Fleet(fleet_config(pg, **overrides), tmp_path / f"fleet{len(started)}")
        proc.workdir.mkdir()
        started.append(proc.start())
        return proc

    yield make
    for proc in started:
        proc.stop()
