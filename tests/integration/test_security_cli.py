"""What `pgfleet check` says about keys that would run as a superuser, `pgfleet rls` when it
cannot help, and backend roles across a RELOAD: real clusters, the real command line.

The red-team tier (test_isolation.py) covers what a tenant's SQL can and cannot do; this file
covers what an operator sees.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from proxy.embedded import Cluster

from .conftest import ROOT, Fleet, closed_port, fleet_config


def run(command: str, config: dict[str, Any], tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "pgfleet.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "proxy", command, "--config", str(path), *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env={"PYTHONPATH": str(ROOT)},
                          check=False)


def superuser_config(pg: Cluster) -> dict[str, Any]:
    config = fleet_config(pg)
    config["databases"]["primary"] = {"dsn": pg.dsn("bank")}  # postgres, the superuser
    config["backend_roles"] = {"pf_scram": {"password": "scrampass"}, "pf_nobody": {}}
    config["keys"] = [
        {"id": "pf_client", "secret": "s", "role": "client"},                       # the dsn's user
        {"id": "pf_web", "secret": "s", "role": "client", "backend_role": "pf_scram"},
        {"id": "pf_tenant", "secret": "s", "role": "database", "user_id": 42, "backend_role": "pf_nobody"},
        {"id": "pf_server", "secret": "s", "role": "server"},                       # not a tenant: no warning
    ]
    return config


def test_check_warns_when_a_client_or_database_key_runs_as_a_superuser(pg: Cluster, tmp_path: Path) -> None:
    out = run("check", superuser_config(pg), tmp_path)
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stdout.splitlines() if line.startswith(("warning:", "note:"))]
    assert warnings == [
        ("warning: key pf_client (client) runs as postgres, a superuser on database primary: give it a "
         "least-privilege backend_role (docs/security.md)"),
        ("warning: key pf_tenant (database) runs as pf_nobody, which does not exist on database primary: "
         "create the role, or fix backend_roles"),
    ]
    assert "pf_web (client) runs as pf_scram" in out.stdout  # the routing map says who runs as whom


def test_check_offline_connects_nowhere_and_says_so_when_it_cannot(pg: Cluster, tmp_path: Path) -> None:
    config = superuser_config(pg)
    with closed_port() as port:
        config["databases"]["primary"] = {"dsn": f"postgresql://postgres:x@127.0.0.1:{port}/bank"}
        offline = run("check", config, tmp_path, "--offline")
        online = run("check", config, tmp_path)
    assert offline.returncode == 0 and "warning:" not in offline.stdout and "note:" not in offline.stdout
    assert online.returncode == 0
    assert f"note: cannot check the roles of database primary (postgresql://postgres@127.0.0.1:{port}/bank)" \
        in online.stdout


def test_rls_refuses_when_no_database_key_has_a_backend_role(pg: Cluster, tmp_path: Path) -> None:
    config = fleet_config(pg, sharding={"shards": ["primary", "secondary"], "tables": {"users": "id"}})
    out = run("rls", config, tmp_path)
    assert out.returncode == 1
    assert out.stderr.startswith("pgfleet rls: no database key runs as a backend role: give database keys a "
                                 "backend_role"), out.stderr
    assert "Traceback" not in out.stderr


def test_rls_with_nothing_sharded_says_so(pg: Cluster, tmp_path: Path) -> None:
    out = run("rls", fleet_config(pg), tmp_path)
    assert out.returncode == 1
    assert "no sharded tables (sharding.tables)" in out.stderr


def test_rls_warns_about_a_sharded_table_that_does_not_exist_yet(pg: Cluster, tmp_path: Path) -> None:
    config = fleet_config(pg, sharding={"shards": ["primary", "secondary"], "tables": {"nosuch": "id"}},
                          backend_roles={"pf_trust": {"default_for": ["database"]}})
    out = run("rls", config, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "warning: primary: table nosuch does not exist yet: create it, then run pgfleet rls again" in out.stderr
    assert "-- (no sharded table there yet)" in out.stdout


def test_a_reload_moves_a_key_to_its_new_backend_role(make_fleet: Any) -> None:
    fleet: Fleet = make_fleet(backend_roles={"pf_md5": {"password": "md5pass"}, "pf_trust": {}},
                              keys=[{"id": "pf_admin", "secret": "admin-secret", "role": "admin"},
                                    {"id": "pf_server", "secret": "server-secret", "role": "server",
                                     "backend_role": "pf_md5"}])
    with psycopg.connect(fleet.dsn("pf_server"), autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == ("pf_md5",)
        with psycopg.connect(fleet.dsn("pf_admin", "pgfleet"), autocommit=True) as admin:
            pools = {(r[0], r[1]) for r in admin.execute("SHOW POOLS").fetchall()}
            assert ("primary", "pf_md5") in pools and ("primary", "pf_scram") in pools
            keys = {r[0]: r for r in admin.execute("SHOW KEYS").fetchall()}
            assert keys["pf_server"][8] == "pf_md5"
            config = dict(fleet.config)
            config["keys"] = [{**k, "backend_role": "pf_trust"} if k["id"] == "pf_server" else k
                              for k in config["keys"]]
            fleet.config_path.write_text(yaml.safe_dump(config))
            assert admin.execute("RELOAD").statusmessage == "RELOAD"
        assert conn.execute("select current_user").fetchone() == ("pf_trust",)
    assert "Traceback" not in fleet.log()


def test_a_backend_role_with_a_wrong_password_says_where_to_fix_it(make_fleet: Any) -> None:
    fleet: Fleet = make_fleet(backend_roles={"pf_md5": {"password": "wrong", "default_for": ["client"]}})
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg.connect(fleet.dsn("pf_client"))
    message = str(err.value)
    assert "refused pgfleet's login as pf_md5" in message and "backend_roles.pf_md5" in message, message
    with psycopg.connect(fleet.dsn("pf_server"), autocommit=True) as conn:  # other keys are unaffected
        assert conn.execute("select current_user").fetchone() == ("pf_scram",)
