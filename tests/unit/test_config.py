"""Configuration (proxy/config.py, `pgfleet check`): YAML + env into one validated snapshot.

Every bad config must be reported as ``path: reason`` naming the key in the config's own
spelling; the CLI must print it on stderr, exit non-zero and never show a traceback or a
secret.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.cli import describe
from proxy.config import Config, load, load_text, parse_duration
from proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

DB = "databases: {primary: {dsn: 'postgresql://u@h/d'}}\n"

FULL = """
listen: {host: 0.0.0.0, port: 7432, database: fleet, auth: md5}
http: {host: 127.0.0.1, port: 9931}
pool: {mode: session, size: 7, acquire_timeout: 250ms, idle_timeout: 2m, lifetime: 1h, connect_timeout: 3}
health: {interval: 30s, timeout: 3s, failures_to_down: 4}
databases:
  primary:   {dsn: "postgresql://postgres:${DB_PASSWORD}@db1.internal:5433/bank?sslmode=disable"}
  secondary: {dsn: "${DB2_DSN}", replicas: ["postgresql://ro@replica:5432/bank"], pool_size: 3}
  analytics: {dsn: "postgresql://postgres@localhost:5434/analytics"}
default_database: secondary
sharding:
  shards: [primary, secondary]
  function: modulo
  tables: {users: id}
  reference_tables: [currencies]
tables: {events: analytics, user_activity: analytics}
two_phase_commit: true
keys:
  - {id: pf_app, secret: "${APP_SECRET}", role: server}
  - {id: pf_web, secret: web, role: client, read_only: true, databases: [secondary], max_connections: 5}
  - {id: pf_t42, secret: t42, role: database, user_id: 42}
replication:
  jobs:
    - {id: j1, source: primary, targets: [analytics], tables: [users], sync_key: updated_at, interval: 15m}
audit: {path: logs/audit.jsonl, statements: full}
"""
FULL_ENV = {"DB_PASSWORD": "pw with spaces", "DB2_DSN": "postgresql://u2:p2@db2:5432/bank2",
            "APP_SECRET": "app-s3cret"}


def error_of(text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        load_text(text, env={} if env is None else env)
    return str(err.value)


# ---------------------------------------------------------------------------------------------
# A valid config


def test_full_config_is_read_into_typed_values() -> None:
    cfg = load_text(FULL, env=FULL_ENV)
    assert isinstance(cfg, Config)
    assert (cfg.listen.host, cfg.listen.port, cfg.listen.database, cfg.listen.auth) == \
        ("0.0.0.0", 7432, "fleet", "md5")
    assert cfg.pool.mode == "session" and cfg.pool.size == 7
    assert cfg.pool.acquire_timeout == 0.25 and cfg.pool.idle_timeout == 120 and cfg.pool.lifetime == 3600
    assert cfg.pool.connect_timeout == 3
    assert cfg.health.failures_to_down == 4
    assert cfg.default_database == "secondary"
    assert cfg.tables == {"events": "analytics", "user_activity": "analytics"}
    assert cfg.sharding.function == "modulo" and cfg.sharding.tables == {"users": "id"}
    assert cfg.two_phase_commit is True
    primary = cfg.dsn("primary")
    assert (primary.host, primary.port, primary.user, primary.password, primary.dbname) == \
        ("db1.internal", 5433, "postgres", "pw with spaces", "bank")
    assert primary.options == (("sslmode", "disable"),)
    secondary = cfg.dsn("secondary")
    assert (secondary.user, secondary.password, secondary.host, secondary.dbname) == ("u2", "p2", "db2", "bank2")
    assert cfg.databases["secondary"].pool_size == 3
    assert cfg.keys[0].secret == "app-s3cret"
    assert cfg.keys[1].read_only and cfg.keys[1].databases == ("secondary",) and cfg.keys[1].max_connections == 5
    assert cfg.keys[2].user_id == 42
    assert cfg.replication.jobs[0].interval == 900
    assert cfg.audit.statements == "full"


def test_defaults() -> None:
    cfg = load_text(DB, env={})
    assert (cfg.listen.host, cfg.listen.port, cfg.listen.database, cfg.listen.auth) == \
        ("127.0.0.1", 6432, "app", "scram-sha-256")
    assert cfg.pool.mode == "transaction" and cfg.pool.size == 20 and cfg.pool.acquire_timeout == 5
    assert cfg.default_database == "primary"
    dsn = cfg.dsn("primary")
    assert (dsn.port, dsn.password) == (5432, None)


def test_default_database_is_primary_or_else_the_first_name() -> None:
    cfg = load_text("databases: {zeta: {dsn: 'postgresql://u@h/z'}, alpha: {dsn: 'postgresql://u@h/a'}}",
                    env={})
    assert cfg.default_database == "alpha"


def test_config_is_frozen() -> None:
    cfg = load_text(DB, env={})
    with pytest.raises(AttributeError):
        cfg.default_database = "other"  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Errors name the path


@pytest.mark.parametrize("text,expected", [
    ("listen: {porter: 1}\n" + DB, "listen.porter: unknown key"),
    ("databases: {primary: {}}", "databases.primary.dsn: missing"),
    (DB.replace("}}", "}, secondary: {replicas: []}}"), "databases.secondary.dsn: missing"),
    ("databases: {primary: {dsn: 'postgresql://u@h/d', pool: 3}}", "databases.primary.pool: unknown key"),
    (DB + "colour: red", "colour: unknown key"),
    (DB + "keys: [{id: a, secret: b, role: server, colour: red}]", "keys[0].colour: unknown key"),
    (DB + "keys: [{id: a, secret: b, role: server}, {id: c, role: server}]", "keys[1].secret: missing"),
    (DB + "keys: [{id: a, secret: b, role: superuser}]", "keys[0].role: invalid enum value 'superuser'"),
    (DB + "pool: {size: many}", "pool.size: expected int, got str"),
    (DB + "pool: {size: 0}", "pool.size: must be at least 1"),
    (DB + "listen: {max_client_connections: 0}", "listen.max_client_connections: must be at least 1"),
    (DB + "keys: [{id: a, secret: b, role: server, max_connections: -1}]", "keys[0].max_connections: must be at least 1"),
    (DB + "shutdown_timeout: later", "shutdown_timeout: expected a duration"),
    (DB + "keys: [{id: a, secret: b, role: server, statement_timeout: soon}]",
     "keys[0].statement_timeout: expected a duration"),
    (DB + "listen: {auth: password}", "listen.auth: password (cleartext) auth is only allowed over TLS"),
    (DB + "listen: {tls: {cert: /nonexistent/c.pem, key: /nonexistent/k.pem}}",
     "listen.tls.cert: no such file: /nonexistent/c.pem"),
    (DB + "listen: {tls: {cert: /etc/passwd, key: /etc/passwd}}", "listen.tls.cert: cannot load"),
    (DB + "listen: {tls: {key: k.pem}}", "listen.tls.cert: missing"),
    ("databases: {primary: {dsn: 'postgresql://u@h/d?sslmode=always'}}",
     "databases.primary.dsn: sslmode=always: use one of disable, allow"),
    (DB + "pool: {acquire_timeout: soon}", "pool.acquire_timeout: expected a duration"),
    (DB + "pool: {idle_timeout: -5}", "pool.idle_timeout: a duration cannot be negative"),
    (DB + "pool: {mode: statement}", "pool.mode: invalid enum value 'statement'"),
    (DB + "listen: {auth: trust}", "listen.auth: invalid enum value 'trust'"),
    (DB + "listen: {port: 70000}", "listen.port: must be between 1 and 65535"),
    (DB + "replication: {jobs: [{id: j, source: primary, targets: [primary], tables: [t], when: now}]}",
     "replication.jobs[0].when: unknown key"),
    ("databases: {primary: {dsn: 'postgresql://u@h/d', replicas: ['mysql://x']}}",
     "databases.primary.replicas[0]: expected a URL"),
    ("databases: {primary: {dsn: 'mysql://x'}}", "databases.primary.dsn: expected a URL"),
    ("databases: {primary: {dsn: 'postgresql://u@h:abc/d'}}", "databases.primary.dsn: the port is not a number"),
    ("listen: {port: 1}", "databases: missing"),
    ("databases: {pgfleet: {dsn: 'postgresql://u@h/d'}}", "databases.pgfleet: this name is reserved"),
    ("databases: {app: {dsn: 'postgresql://u@h/d'}}", "listen.database: 'app' is also a database name"),
    (DB + "keys: [{id: a, secret: b, role: server}, {id: a, secret: c, role: server}]",
     "keys[1].id: duplicate key id 'a'"),
    (DB + "keys: [{id: a, secret: b, role: database}]", "keys[0].user_id: missing"),
    (DB + "listen: {auth: md5}\nkeys: [{id: a, secret: 'SCRAM-SHA-256$4096:c2FsdA==$AAAA:BBBB', role: server}]",
     "keys[0].secret: a SCRAM verifier cannot answer md5 auth"),
    ("databases: {primary: [", "config: not valid YAML (line 1)"),
    ("- a\n- b", "config: the top level must be a mapping"),
])
def test_errors_name_the_path_and_the_reason(text: str, expected: str) -> None:
    assert error_of(text).startswith(expected)


@pytest.mark.parametrize("text,expected", [
    (DB + "default_database: nope", "default_database: 'nope' is not one of databases: primary"),
    (DB + "tables: {events: analytics}", "tables.events: 'analytics' is not one of databases: primary"),
    (DB + "keys: [{id: a, secret: b, role: server, databases: [primary, analytics]}]",
     "keys[0].databases: 'analytics' is not one of databases"),
    (DB + "sharding: {shards: [primary, x]}", "sharding.shards[1]: 'x' is not one of databases"),
    (DB + "replication: {jobs: [{id: j, source: primary, targets: [zzz], tables: [t]}]}",
     "replication.jobs[0]: 'zzz' is not one of databases"),
    (DB + "sharding: {tables: {users: id}}", "sharding.shards: missing"),
    (DB + "sharding: {shards: [primary], tables: {users: id}}\ntables: {users: primary}",
     "tables.users: is also a sharded table"),
])
def test_references_to_unknown_databases_are_errors(text: str, expected: str) -> None:
    assert error_of(text).startswith(expected)


# ---------------------------------------------------------------------------------------------
# ${ENV} and ${ENV:-default}


def test_env_interpolation() -> None:
    text = """
databases:
  primary: {dsn: "postgresql://${PGUSER_X}:${PGPASS_X}@${PGHOST_X:-localhost}:${PGPORT_X:-5432}/${PGDB_X:-bank}"}
keys: [{id: "${KEY_ID}", secret: "pre-${KEY_SECRET}-post", role: server}]
"""
    cfg = load_text(text, env={"PGUSER_X": "alice", "PGPASS_X": "pa:ss", "PGPORT_X": "6000",
                               "KEY_ID": "pf_x", "KEY_SECRET": "mid"})
    dsn = cfg.dsn("primary")
    assert (dsn.user, dsn.host, dsn.port, dsn.dbname) == ("alice", "localhost", 6000, "bank")
    assert (cfg.keys[0].id, cfg.keys[0].secret) == ("pf_x", "pre-mid-post")


def test_env_set_to_empty_wins_over_default_and_empty_default_is_allowed() -> None:
    text = "databases: {primary: {dsn: 'postgresql://u@h/d'}}\nkeys: [{id: k, secret: 'a${E:-dflt}${F:-}b', role: server}]"
    assert load_text(text, env={"E": ""}).keys[0].secret == "ab"
    assert load_text(text, env={}).keys[0].secret == "adfltb"


def test_missing_env_var_names_the_path_and_the_variable() -> None:
    assert error_of("databases: {primary: {dsn: '${NOPE_DSN}'}}") == \
        "databases.primary.dsn: environment variable NOPE_DSN is not set"
    assert error_of(DB + "keys: [{id: a, secret: '${APP_SECRET}', role: server}]") == \
        "keys[0].secret: environment variable APP_SECRET is not set"


def test_load_uses_the_process_environment_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGFLEET_TEST_DSN", "postgresql://x@envhost/envdb")
    path = tmp_path / "c.yaml"
    path.write_text("databases: {primary: {dsn: '${PGFLEET_TEST_DSN}'}}")
    assert load(path).dsn("primary").host == "envhost"


def test_unreadable_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path / "nope.yaml", env={})
    assert str(err.value).startswith(f"{tmp_path / 'nope.yaml'}: cannot read the config file")


# ---------------------------------------------------------------------------------------------
# Durations


@pytest.mark.parametrize("value,seconds", [
    ("5s", 5), ("250ms", 0.25), ("15m", 900), ("1h", 3600), ("1d", 86400), ("2", 2), ("1.5s", 1.5),
    (3, 3), (0.5, 0.5), (0, 0), (" 5s ", 5),
])
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["5 sec", "-1s", "5S", "", "s", True, None, -1, [5], "1h30m"])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


# ---------------------------------------------------------------------------------------------
# The seeds' environment variables, when there is no config file


def test_db_env_vars_build_primary_secondary_analytics() -> None:
    env = {"DB_HOST": "h1", "DB_PORT": "5433", "DB_NAME": "bank", "DB_USER": "alice", "DB_PASSWORD": "p@ss/1",
           "DB2_HOST": "h2", "DB2_NAME": "bank2",
           "DB3_HOST": "h3", "DB3_PORT": "5435", "DB3_NAME": "analytics", "DB3_USER": "bob"}
    cfg = load(None, env=env)
    assert set(cfg.databases) == {"primary", "secondary", "analytics"}
    assert cfg.default_database == "primary"
    p = cfg.dsn("primary")
    assert (p.host, p.port, p.dbname, p.user, p.password) == ("h1", 5433, "bank", "alice", "p@ss/1")
    s = cfg.dsn("secondary")
    assert (s.host, s.port, s.dbname, s.user, s.password) == ("h2", 5432, "bank2", "postgres", None)
    a = cfg.dsn("analytics")
    assert (a.host, a.port, a.dbname, a.user) == ("h3", 5435, "analytics", "bob")


def test_multi_db_env_vars() -> None:
    env = {"MULTI_DB_REPORTING_HOST": "rh", "MULTI_DB_REPORTING_PORT": "6000",
           "MULTI_DB_REPORTING_USERNAME": "rep", "MULTI_DB_REPORTING_PASSWORD": "rp",
           "MULTI_DB_REPORTING_DATABASE": "reports",
           "MULTI_DB_EU_WEST_HOST": "ew",
           "DB_HOST": "h1", "DB_NAME": "bank"}
    cfg = load(None, env=env)
    assert set(cfg.databases) == {"primary", "reporting", "eu_west"}
    r = cfg.dsn("reporting")
    assert (r.host, r.port, r.user, r.password, r.dbname) == ("rh", 6000, "rep", "rp", "reports")
    e = cfg.dsn("eu_west")
    assert (e.host, e.port, e.dbname) == ("ew", 5432, "eu_west")


def test_env_databases_fill_a_file_without_databases() -> None:
    cfg = load_text("tables: {events: analytics}", env={"DB_NAME": "bank", "DB3_NAME": "an"})
    assert set(cfg.databases) == {"primary", "analytics"}
    assert cfg.tables == {"events": "analytics"}


def test_a_file_with_databases_ignores_the_env_vars() -> None:
    cfg = load_text(DB, env={"DB2_HOST": "h2", "DB2_NAME": "x"})
    assert set(cfg.databases) == {"primary"}


def test_no_databases_anywhere_is_an_error() -> None:
    with pytest.raises(ConfigError) as err:
        load(None, env={"DB_PORT": "5432"})  # a port alone does not make a database
    assert str(err.value).startswith("databases: missing")


# ---------------------------------------------------------------------------------------------
# describe() and `pgfleet check`


def test_describe_shows_the_routing_map_without_secrets() -> None:
    text = describe(load_text(FULL, env=FULL_ENV))
    assert "secondary (default): postgresql://u2@db2:5432/bank2" in text
    assert "primary: postgresql://postgres@db1.internal:5433/bank" in text
    assert "events -> analytics" in text and "user_activity -> analytics" in text
    assert "everything else -> secondary" in text
    assert "pf_web (client) databases=secondary read_only" in text
    for secret in ("pw with spaces", "p2", "app-s3cret", "web", "t42"):
        assert f":{secret}@" not in text and f" {secret}\n" not in text
    assert "app-s3cret" not in text and "pw with spaces" not in text


def pgfleet(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "DB2_", "DB3_", "MULTI_DB_"))}
    full_env.update(env or {})
    full_env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=60, check=False)


def test_check_prints_the_routing_map_and_never_the_secrets(tmp_path: Path) -> None:
    path = tmp_path / "pgfleet.yaml"
    path.write_text("""
databases:
  primary: {dsn: "postgresql://bankuser:db-PASSWORD-123@127.0.0.1:5432/bank"}
  analytics: {dsn: "postgresql://an:${AN_PW}@127.0.0.1:5433/analytics"}
tables: {events: analytics}
keys:
  - {id: pf_app, secret: "KEY-SECRET-456", role: server}
  - {id: pf_ro, secret: "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$AAAA:BBBB", role: client, read_only: true}
""")
    result = pgfleet("check", "--config", str(path), env={"AN_PW": "ENV-PASSWORD-789"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "primary (default): postgresql://bankuser@127.0.0.1:5432/bank" in out
    assert "analytics: postgresql://an@127.0.0.1:5433/analytics" in out
    assert "events -> analytics" in out
    assert "everything else -> primary" in out
    assert "pf_app (server)" in out and "pf_ro (client) read_only" in out
    both = out + result.stderr
    for secret in ("db-PASSWORD-123", "KEY-SECRET-456", "ENV-PASSWORD-789", "c2FsdHNhbHRzYWx0c2FsdA=="):
        assert secret not in both


@pytest.mark.parametrize("text,env,expected", [
    ("listen: {porter: 1}\n" + DB, {}, "listen.porter: unknown key"),
    ("databases: {primary: {}}", {}, "databases.primary.dsn: missing"),
    ("databases: {primary: {dsn: '${MISSING_VAR}'}}", {}, "databases.primary.dsn: environment variable MISSING_VAR"),
    ("databases: {primary: [", {}, "not valid YAML"),
    (DB + "keys: [{id: a, secret: 'SCRAM-SHA-256$broken', role: server}]", {},
     "keys[0].secret: not a SCRAM-SHA-256 verifier"),
])
def test_check_with_a_bad_config_exits_nonzero_with_path_and_reason(
        tmp_path: Path, text: str, env: dict[str, str], expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = pgfleet("check", "--config", str(path), env=env)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


def test_run_with_a_bad_config_exits_nonzero_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("databases: {primary: {}}")
    result = pgfleet("run", "--config", str(path))
    assert result.returncode != 0
    assert "databases.primary.dsn: missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_with_a_missing_file_and_with_no_config_at_all(tmp_path: Path) -> None:
    result = pgfleet("check", "--config", str(tmp_path / "absent.yaml"))
    assert result.returncode != 0
    assert f"{tmp_path / 'absent.yaml'}: cannot read the config file" in result.stderr
    assert "Traceback" not in result.stderr
    result = pgfleet("check")
    assert result.returncode != 0
    assert "databases: missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_builds_the_fleet_from_the_seed_env_vars() -> None:
    result = pgfleet("check", env={"DB_HOST": "127.0.0.1", "DB_NAME": "bank", "DB_PASSWORD": "SEEDPW-1",
                                   "MULTI_DB_REPORTS_HOST": "10.0.0.9", "MULTI_DB_REPORTS_PASSWORD": "SEEDPW-2"})
    assert result.returncode == 0, result.stderr
    assert "primary (default): postgresql://postgres@127.0.0.1:5432/bank" in result.stdout
    assert "reports: postgresql://postgres@10.0.0.9:5432/reports" in result.stdout
    assert "SEEDPW" not in result.stdout + result.stderr


def test_version() -> None:
    result = pgfleet("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("pgfleet ")
