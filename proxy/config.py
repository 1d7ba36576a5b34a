"""Configuration: YAML (or the seeds' environment variables) into one frozen, typed snapshot.

This module owns reading, interpolating (``${ENV}``, ``${ENV:-default}``) and validating the
configuration. Every problem is a ``ConfigError("path.of.key", "reason")``; it never lets a
traceback or a half-valid snapshot out. It does no I/O beyond reading the file it is given.
"""

from __future__ import annotations

import base64
import os
import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

import msgspec
import yaml

from .errors import ConfigError

ADMIN_DATABASE = "pgfleet"


SHARD_KEY_TYPES = ("smallint", "integer", "int", "bigint", "character varying", "text", "uuid",
                   "int2", "int4", "int8", "varchar")


class Duration(float):
    """Seconds, written in the config as ``5s``, ``250ms``, ``15m``, ``1h`` or a number."""


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "": 1.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|)\s*$")


def parse_duration(value: object) -> Duration:
    if isinstance(value, bool):  # every bad duration is a ValueError, whatever its type
        raise ValueError("expected a duration such as 5s, 250ms, 15m or 1h")  # noqa: TRY004
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return Duration(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return Duration(float(match.group(1)) * _UNITS[match.group(2)])
    raise ValueError(f"expected a duration such as 5s, 250ms, 15m or 1h, got {value!r}")


class _Struct(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A config section: immutable, unknown keys refused. Each subclass says ``frozen=True``
    again: msgspec inherits it, but mypy (dataclass_transform) would take it for mutable."""


class Tls(_Struct, frozen=True):
    cert: str                 # PEM certificate chain
    key: str                  # PEM private key
    required: bool = False    # refuse clients that do not ask for TLS (28000)


class Listen(_Struct, frozen=True):
    host: str = "127.0.0.1"
    port: int = 6432
    database: str = "app"
    auth: Literal["scram-sha-256", "md5", "password"] = "scram-sha-256"
    max_message_size: int = 256 * 1024 * 1024
    max_client_connections: int | None = None  # past it, a new client gets 53300
    tls: Tls | None = None


class Http(_Struct, frozen=True):
    """The HTTP listener: /metrics and health, the replication endpoints, and SQL over HTTP
    (api/): its limits."""

    host: str = "127.0.0.1"
    port: int = 9930
    max_body: int = 1024 * 1024           # a request's body, bytes (413 past it)
    max_response: int = 64 * 1024 * 1024  # a result's values, bytes (507 past it: page, or stream)
    statement_timeout: Duration = Duration(30.0)  # for keys without a statement_timeout of their own
    max_requests_per_key: int = 64        # running at once (429 past it)
    tls: Tls | Literal["listen"] | None = None  # HTTPS: a certificate of its own, or listen.tls's


class Pool(_Struct, frozen=True):
    mode: Literal["transaction", "session"] = "transaction"
    size: int = 20
    acquire_timeout: Duration = Duration(5.0)
    idle_timeout: Duration = Duration(60.0)
    lifetime: Duration = Duration(3600.0)
    connect_timeout: Duration = Duration(5.0)


class Health(_Struct, frozen=True):
    """The checker of each database (backend/health.py): ``SELECT 1`` every ``interval``, within
    ``timeout``; ``failures_to_down`` failures in a row open the database's circuit."""

    interval: Duration = Duration(30.0)
    timeout: Duration = Duration(3.0)
    failures_to_down: int = 3

    def __post_init__(self) -> None:
        for field in ("interval", "timeout"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be more than 0s")
        if self.failures_to_down < 1:
            raise ValueError("failures_to_down must be at least 1")


class Dsn(_Struct, frozen=True):
    """A backend address, parsed from a ``postgresql://`` URL."""

    host: str
    port: int
    user: str
    password: str | None
    dbname: str
    options: tuple[tuple[str, str], ...] = ()

    def safe(self) -> str:
        """The address without the password, for logs and ``pgfleet check``."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"


class Database(_Struct, frozen=True):
    dsn: str
    replicas: tuple[str, ...] = ()
    pool_size: int | None = None
    optional: bool = False  # /health/ready does not wait for it
    max_replica_lag: Duration = Duration(10.0)  # a replica further behind than this is skipped


class Sharding(_Struct, frozen=True):
    shards: tuple[str, ...] = ()
    function: Literal["hash", "modulo"] = "hash"
    tables: dict[str, str] = {}
    reference_tables: tuple[str, ...] = ()
    types: dict[str, str] = {}


KEY_ROLES = ("admin", "server", "client", "database")

# Statement kinds a key's policy allows or denies (router/policy.py says what each covers).
STATEMENT_KINDS = ("select", "insert", "update", "delete", "merge", "copy", "call", "ddl", "create_function",
                   "do", "alter_system", "load", "copy_program", "copy_file", "set_role", "set_parser", "lock",
                   "maintenance")


class Rules(_Struct, frozen=True):
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()


class Policy(_Struct, frozen=True):
    """A key's own statement policy: widens (allow) or narrows (deny) its role's defaults."""

    statements: Rules = Rules()
    functions: Rules = Rules()
    tables: Rules = Rules()  # tables.allow: only these (catalogs aside); tables.deny: never these


class BackendRole(_Struct, frozen=True):
    """A PostgreSQL role that keys' statements run as: each database's dsn with this user."""

    password: str | None = None
    default_for: tuple[Literal["admin", "server", "client", "database"], ...] = ()


class Directory(_Struct, frozen=True):
    """The tenant directory (``proxy/directory/``): tenants' databases looked up by name in a
    registry database at run time, each with a pool of its own opened at its first client."""

    registry: str                  # one of databases: where the table (or query) is
    table: str | None = None       # name, host, port, dbname, user, password (encrypted) | dsn
    query: str | None = None       # or a query returning those columns (filtered by name)
    encryption_key: str | None = None  # Fernet key(s), comma-separated: the first encrypts, all decrypt
    cache_ttl: Duration = Duration(30.0)  # a row is trusted this long; known tenants re-read as often
    idle_timeout: Duration = Duration(60.0)  # a tenant pool without clients this long is closed
    pool_size: int = 5
    max_backends_per_host: int | None = None  # backends to one host:port over all tenant pools
    hosts: dict[str, str] = {}     # CREATE TENANT: name -> an admin dsn on that server
    template: str | None = None    # CREATE TENANT's default template (PostgreSQL's: template1)
    top: int = 10                  # SHOW POOLS and /metrics: the busiest tenant pools shown


class Key(_Struct, frozen=True):
    id: str
    secret: str
    role: Literal["admin", "server", "client", "database"]
    databases: tuple[str, ...] | None = None
    read_only: bool = False
    max_connections: int | None = None
    statement_timeout: Duration | None = None  # pgfleet cancels a statement of this key running longer
    user_id: int | str | None = None
    shard_key: int | str | None = None
    backend_role: str | None = None  # one of backend_roles; default: the one whose default_for has its role
    policy: Policy | None = None
    tenant: str | None = None  # a database key bound to one tenant of the directory


class ReplicationJob(_Struct, frozen=True):
    """A job of replication/jobs.py: ``watermark`` (``batch``, the seeds' word, is the same)
    copies the rows changed since the last run every ``interval``; ``logical`` sets up
    PostgreSQL's logical replication of the tables."""

    id: str
    source: str
    targets: tuple[str, ...]
    tables: tuple[str, ...]
    sync_key: str = "updated_at"
    interval: Duration = Duration(900.0)
    enabled: bool = True
    mode: Literal["watermark", "batch", "logical"] = "watermark"
    verify: bool = False  # VERIFY after each run
    batch_size: int = 20_000  # rows per batch (each batch commits with its watermark)


class Replication(_Struct, frozen=True):
    jobs: tuple[ReplicationJob, ...] = ()


class RouterConfig(_Struct, frozen=True):
    plan_cache_size: int = 10000  # analyses of distinct statement texts kept (LRU)


class Audit(_Struct, frozen=True):
    """The audit log (``admin/audit.py``): one JSON line or row per statement."""

    path: str | None = None                  # a file of JSON lines
    table: str | None = None                 # a database (of databases:) whose pgfleet.audit gets rows
    statements: Literal["normalized", "full", "none"] = "normalized"
    max_bytes: int = 100 * 1024 * 1024       # the file rotates past this size; 0: never
    backups: int = 5                         # rotated files kept: path.1 ... path.<backups>
    queue_size: int = 10000                  # statements waiting for the writer; past it, dropped
    retry_interval: Duration = Duration(5.0)  # a failed sink is tried again after this long


class Config(_Struct, frozen=True):
    listen: Listen = Listen()
    http: Http | None = None
    pool: Pool = Pool()
    health: Health = Health()
    databases: dict[str, Database] = {}
    default_database: str | None = None
    sharding: Sharding = Sharding()
    tables: dict[str, str] = {}
    router: RouterConfig = RouterConfig()
    two_phase_commit: bool = False
    shutdown_timeout: Duration = Duration(30.0)  # SIGTERM: how long open transactions may finish
    backend_roles: dict[str, BackendRole] = {}
    keys: tuple[Key, ...] = ()
    replication: Replication = Replication()
    audit: Audit = Audit()
    directory: Directory | None = None

    def dsn(self, database: str) -> Dsn:
        return parse_dsn(self.databases[database].dsn, f"databases.{database}.dsn")

    def backend_role_of(self, key: Key) -> str | None:
        """The PostgreSQL role a key's statements run as; None: the dsn's own user."""
        if key.backend_role is not None:
            return key.backend_role
        for name, role in self.backend_roles.items():
            if key.role in role.default_for:
                return name
        return None

    @property
    def default(self) -> str:
        assert self.default_database is not None  # validate() guarantees it
        return self.default_database


# ---------------------------------------------------------------------------------------------
# Reading


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(node: Any, env: Mapping[str, str], path: str) -> Any:
    if isinstance(node, str):
        def repl(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(path, f"environment variable {name} is not set")

        return _ENV_REF.sub(repl, node)
    if isinstance(node, dict):
        return {k: _interpolate(v, env, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, env, f"{path}[{i}]") for i, v in enumerate(node)]
    return node


def _dec_hook(type_: type, obj: Any) -> Any:
    if type_ is Duration:
        return parse_duration(obj)
    raise NotImplementedError


_MSGSPEC_PATH = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")


def _explain(err: msgspec.ValidationError) -> ConfigError:
    """Turn msgspec's message into ``path: reason`` in the config's own spelling."""
    match = _MSGSPEC_PATH.match(str(err))
    assert match is not None
    what, path = match.group("what"), (match.group("path") or "")
    path = re.sub(r"\[(\d+)\]", r"[\1]", path).lstrip(".")
    unknown = re.match(r"Object contains unknown field `([^`]+)`", what)
    if unknown:
        return ConfigError(_join(path, unknown.group(1)), "unknown key")
    missing = re.match(r"Object missing required field `([^`]+)`", what)
    if missing:
        return ConfigError(_join(path, missing.group(1)), "missing")
    what = what.replace("`", "")
    return ConfigError(path, what[0].lower() + what[1:] if what else "invalid")


def _join(path: str, key: str) -> str:
    if not path:
        return key
    return f"{path}{key}" if key.startswith("[") else f"{path}.{key}"


def load_text(text: str, env: Mapping[str, str] | None = None, source: str = "config") -> Config:
    env = os.environ if env is None else env
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else source
        raise ConfigError(source, f"not valid YAML ({where}): {getattr(exc, 'problem', exc)}")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, "the top level must be a mapping of keys such as listen:, databases:")
    raw = _interpolate(raw, env, "")
    if not raw.get("databases"):
        raw["databases"] = databases_from_env(env)
    databases = raw.get("databases")
    if isinstance(databases, dict):
        # Converted one by one so that an error names the database, not msgspec's "[...]".
        raw["databases"] = {name: _convert(entry, Database, f"databases.{name}")
                            for name, entry in databases.items()}
    return validate(_convert(raw, Config, ""))


def _convert(raw: Any, type_: type[Any], path: str) -> Any:
    try:
        return msgspec.convert(raw, type_, dec_hook=_dec_hook, strict=False)
    except msgspec.ValidationError as exc:
        err = _explain(exc)
        raise ConfigError(_join(path, err.path) if err.path else path, err.reason) from None


def load(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> Config:
    """Load the config file at ``path``; with no path, build it from the environment."""
    return load_text(read_config(path), env, source=str(path) if path is not None else "environment")


def read_config(path: str | os.PathLike[str] | None) -> str:
    """The text of the config file at ``path``; "" (all from the environment) with no path."""
    if path is None:
        return ""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the config file: {exc.strerror}") from None


def databases_from_env(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The seeds' variables: DB_* (primary), DB2_* (secondary), DB3_* (analytics), MULTI_DB_<N>_*."""
    found: dict[str, dict[str, Any]] = {}
    for prefix, name in (("DB", "primary"), ("DB2", "secondary"), ("DB3", "analytics")):
        if f"{prefix}_HOST" in env or f"{prefix}_NAME" in env:
            found[name] = {"dsn": _url(
                env.get(f"{prefix}_HOST", "localhost"), env.get(f"{prefix}_PORT", "5432"),
                env.get(f"{prefix}_USER", "postgres"), env.get(f"{prefix}_PASSWORD"),
                env.get(f"{prefix}_NAME", "postgres"))}
    multi = re.compile(r"^MULTI_DB_([A-Z0-9]+(?:_[A-Z0-9]+)*?)_(HOST|PORT|USERNAME|PASSWORD|DATABASE)$")
    groups: dict[str, dict[str, str]] = {}
    for var, value in env.items():
        m = multi.match(var)
        if m:
            groups.setdefault(m.group(1).lower(), {})[m.group(2)] = value
    for name, parts in sorted(groups.items()):
        found[name] = {"dsn": _url(
            parts.get("HOST", "localhost"), parts.get("PORT", "5432"),
            parts.get("USERNAME", "postgres"), parts.get("PASSWORD"),
            parts.get("DATABASE", name))}
    return found


def _url(host: str, port: str, user: str, password: str | None, dbname: str) -> str:
    from urllib.parse import quote

    auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
    return f"postgresql://{auth}@{host}:{port}/{quote(dbname, safe='')}"


def parse_dsn(dsn: str, path: str) -> Dsn:
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(path, "expected a URL such as postgresql://user:password@host:5432/dbname")
    try:
        port = parts.port or 5432
    except ValueError:
        raise ConfigError(path, "the port is not a number") from None
    dbname = unquote(parts.path.lstrip("/"))
    user = unquote(parts.username) if parts.username else "postgres"
    return Dsn(
        host=parts.hostname or "localhost",
        port=port,
        user=user,
        password=unquote(parts.password) if parts.password is not None else None,
        dbname=dbname or user,
        options=tuple(parse_qsl(parts.query)),
    )


# ---------------------------------------------------------------------------------------------
# Validation beyond the types: names that must refer to something.


def validate(config: Config) -> Config:
    if not config.databases:
        raise ConfigError("databases", "missing: list at least one database, or set DB_HOST/DB_NAME")
    names = set(config.databases)
    if ADMIN_DATABASE in names:
        raise ConfigError(f"databases.{ADMIN_DATABASE}", "this name is reserved for the admin console")
    if config.listen.database in names:
        raise ConfigError("listen.database",
                          f"{config.listen.database!r} is also a database name: pick another fleet name")
    if config.http is not None:
        for name in ("max_body", "max_response", "max_requests_per_key"):
            if getattr(config.http, name) < 1:
                raise ConfigError(f"http.{name}", "must be at least 1")
        if config.http.statement_timeout <= 0:
            raise ConfigError("http.statement_timeout", "must be more than 0s")
        if config.http.tls == "listen" and config.listen.tls is None:
            raise ConfigError("http.tls", "'listen' takes listen.tls's certificate, and listen.tls is not set")
        if isinstance(config.http.tls, Tls):
            server_tls(config.http.tls)  # the files must load now
    if not 0 < config.listen.port < 65536:
        raise ConfigError("listen.port", "must be between 1 and 65535")
    if config.listen.tls is not None:
        server_tls(config.listen.tls)  # the files must load now, not at the first client
    elif config.listen.auth == "password":
        raise ConfigError("listen.auth", "password (cleartext) auth is only allowed over TLS: "
                          "configure listen.tls, or use scram-sha-256")
    for name, db in config.databases.items():
        sslmode = dict(parse_dsn(db.dsn, f"databases.{name}.dsn").options).get("sslmode", "prefer")
        if sslmode not in SSLMODES:
            raise ConfigError(f"databases.{name}.dsn", f"sslmode={sslmode}: use one of {', '.join(SSLMODES)}")
    for name, db in config.databases.items():
        parse_dsn(db.dsn, f"databases.{name}.dsn")
        for i, replica in enumerate(db.replicas):
            parse_dsn(replica, f"databases.{name}.replicas[{i}]")
        if db.pool_size is not None and db.pool_size < 1:
            raise ConfigError(f"databases.{name}.pool_size", "must be at least 1")
    if config.pool.size < 1:
        raise ConfigError("pool.size", "must be at least 1")
    if config.listen.max_client_connections is not None and config.listen.max_client_connections < 1:
        raise ConfigError("listen.max_client_connections", "must be at least 1 (leave it out for no limit)")
    default = config.default_database
    if default is None:
        default = "primary" if "primary" in names else min(names)
        config = msgspec.structs.replace(config, default_database=default)
    elif default not in names:
        raise ConfigError("default_database", f"{default!r} is not one of databases: {', '.join(sorted(names))}")
    for table, database in config.tables.items():
        if database not in names:
            raise ConfigError(f"tables.{table}", f"{database!r} is not one of databases: {', '.join(sorted(names))}")
    for i, shard in enumerate(config.sharding.shards):
        if shard not in names:
            raise ConfigError(f"sharding.shards[{i}]", f"{shard!r} is not one of databases")
    if config.sharding.tables and not config.sharding.shards:
        raise ConfigError("sharding.shards", "missing: sharded tables need at least one shard")
    for table in config.sharding.tables:
        if table in config.tables:
            raise ConfigError(f"tables.{table}", "is also a sharded table: a table is either mapped or sharded")
    for table in config.sharding.reference_tables:
        if table in config.sharding.tables or table in config.tables:
            raise ConfigError("sharding.reference_tables", f"{table} is also a sharded or mapped table")
    if config.sharding.reference_tables and not config.sharding.shards:
        raise ConfigError("sharding.shards", "missing: reference tables need at least one shard")
    for table, type_name in config.sharding.types.items():
        if table not in config.sharding.tables:
            raise ConfigError(f"sharding.types.{table}", "is not one of sharding.tables")
        if type_name.strip().lower().split("(")[0].strip() not in SHARD_KEY_TYPES:
            raise ConfigError(f"sharding.types.{table}", f"{type_name!r}: shard keys may be "
                              f"{', '.join(sorted(set(SHARD_KEY_TYPES)))}")
    if config.router.plan_cache_size < 1:
        raise ConfigError("router.plan_cache_size", "must be at least 1")
    _validate_backend_roles(config)
    seen: set[str] = set()
    for i, key in enumerate(config.keys):
        where = f"keys[{i}]"
        if not key.id:
            raise ConfigError(f"{where}.id", "missing")
        if key.id in seen:
            raise ConfigError(f"{where}.id", f"duplicate key id {key.id!r}")
        seen.add(key.id)
        if not key.secret:
            raise ConfigError(f"{where}.secret", "missing")
        for database in key.databases or ():
            # A pattern (server_*) or, with a directory, a tenant's name may be any name.
            if database not in names and not is_pattern(database) and config.directory is None:
                raise ConfigError(f"{where}.databases", f"{database!r} is not one of databases (a pattern "
                                  "such as server_* or a tenant's name needs directory:)")
        if key.max_connections is not None and key.max_connections < 1:
            raise ConfigError(f"{where}.max_connections", "must be at least 1 (leave it out for no limit)")
        if key.tenant is not None:
            if key.role != "database":
                raise ConfigError(f"{where}.tenant", "only a database key is bound to one tenant (role: database)")
            if config.directory is None:
                raise ConfigError(f"{where}.tenant", "a tenant binding needs directory:")
            if key.tenant in names or key.tenant in (config.listen.database, ADMIN_DATABASE):
                raise ConfigError(f"{where}.tenant", f"{key.tenant!r} is a configured database's name, not a "
                                  "tenant's")
            if key.user_id is not None or key.shard_key is not None or key.databases is not None:
                raise ConfigError(f"{where}.tenant", "a key bound to a tenant takes no user_id, shard_key "
                                  "or databases: it reaches that tenant's database only")
        elif key.role == "database" and key.user_id is None and key.shard_key is None:
            raise ConfigError(f"{where}.user_id", "missing: a database key is bound to one shard-key value "
                              "(or, with directory:, to one tenant: tenant:)")
        if key.backend_role is not None and key.backend_role not in config.backend_roles:
            raise ConfigError(f"{where}.backend_role", f"{key.backend_role!r} is not one of backend_roles: "
                              f"{', '.join(config.backend_roles) or '(none configured)'}")
        if key.policy is not None:
            _validate_policy(key.policy, f"{where}.policy", key.role)
        if key.secret.startswith("SCRAM-SHA-256$") and config.listen.auth != "scram-sha-256":
            raise ConfigError(f"{where}.secret",
                              f"a SCRAM verifier cannot answer {config.listen.auth} auth: give the plain secret")
    _validate_audit(config.audit, names)
    if config.directory is not None:
        _validate_directory(config.directory, names)
    ids: set[str] = set()
    for i, job in enumerate(config.replication.jobs):
        for database in (job.source, *job.targets):
            if database not in names:
                raise ConfigError(f"replication.jobs[{i}]", f"{database!r} is not one of databases")
        if job.source in job.targets:
            raise ConfigError(f"replication.jobs[{i}].targets", f"the source {job.source!r} cannot be a target")
        if not job.targets or not job.tables:
            raise ConfigError(f"replication.jobs[{i}]", "needs at least one target and one table")
        if job.id in ids:
            raise ConfigError(f"replication.jobs[{i}].id", f"{job.id!r} is the id of another job too")
        ids.add(job.id)
        if job.interval <= 0 or job.batch_size < 1:
            raise ConfigError(f"replication.jobs[{i}]", "interval must be more than 0s and batch_size at least 1")
    return config


def is_pattern(name: str) -> bool:
    """Whether an allow-list entry is a pattern (fnmatch: ``*``, ``?``, ``[...]``)."""
    return any(c in name for c in "*?[")


_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


def fernet_keys(text: str) -> list[bytes]:
    """The Fernet keys of ``directory.encryption_key`` (comma-separated; each 32 bytes in
    url-safe base64), or ValueError saying which is wrong."""
    keys = []
    for i, part in enumerate(p.strip() for p in text.split(",")):
        try:
            raw = base64.urlsafe_b64decode(part.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raw = b""
        if len(raw) != 32:
            raise ValueError(f"key {i + 1} is not a Fernet key (32 bytes in url-safe base64, as "
                             "`pgfleet tenants key` prints)")
        keys.append(part.encode("ascii"))
    return keys


def _validate_directory(directory: Directory, names: set[str]) -> None:
    where = "directory"
    if directory.registry not in names:
        raise ConfigError(f"{where}.registry", f"{directory.registry!r} is not one of databases")
    if (directory.table is None) == (directory.query is None):
        raise ConfigError(f"{where}.table", "give either table: (the registry table) or query: (a query "
                          "returning name, host, port, dbname, user, password), not both or neither")
    if directory.table is not None and not _TABLE_NAME.match(directory.table):
        raise ConfigError(f"{where}.table", f"{directory.table!r}: a table name, optionally schema-qualified")
    if directory.encryption_key is not None:
        try:
            fernet_keys(directory.encryption_key)
        except ValueError as exc:
            raise ConfigError(f"{where}.encryption_key", str(exc)) from None
    for field in ("cache_ttl", "idle_timeout"):
        if getattr(directory, field) <= 0:
            raise ConfigError(f"{where}.{field}", "must be more than 0s")
    if directory.pool_size < 1 or directory.top < 1:
        raise ConfigError(f"{where}.pool_size", "pool_size and top must be at least 1")
    cap = directory.max_backends_per_host
    if cap is not None and cap < 1:
        raise ConfigError(f"{where}.max_backends_per_host", "must be at least 1 (leave it out for no cap)")
    for name, dsn in directory.hosts.items():
        parse_dsn(dsn, f"{where}.hosts.{name}")


def _validate_backend_roles(config: Config) -> None:
    defaults: dict[str, str] = {}
    for name, role in config.backend_roles.items():
        where = f"backend_roles.{name}"
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(where, "a PostgreSQL role name of letters, digits, _ and - is expected")
        for key_role in role.default_for:
            if key_role in defaults:
                raise ConfigError(f"{where}.default_for", f"{key_role} keys already default to "
                                  f"{defaults[key_role]}: one default backend role per key role")
            defaults[key_role] = name


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?\*?$")


def _validate_policy(policy: Policy, where: str, key_role: str) -> None:
    if key_role == "admin":
        raise ConfigError(where, "admin keys may do everything: a policy would not apply; use a server key")
    for field in ("allow", "deny"):
        for kind in getattr(policy.statements, field):
            if kind not in STATEMENT_KINDS:
                raise ConfigError(f"{where}.statements.{field}",
                                  f"unknown statement kind {kind!r}: use {', '.join(STATEMENT_KINDS)}")
        for part in ("functions", "tables"):
            for name in getattr(getattr(policy, part), field):
                if not _IDENTIFIER.match(name):
                    raise ConfigError(f"{where}.{part}.{field}", f"{name!r} is not a {part[:-1]} name "
                                      "(name or schema.name; a trailing * matches a prefix)")


def _validate_audit(audit: Audit, names: set[str]) -> None:
    if audit.path is not None and not audit.path.strip():
        raise ConfigError("audit.path", "empty: give a file path, or leave the key out")
    if audit.table is not None and audit.table not in names:
        raise ConfigError("audit.table", f"{audit.table!r} is not one of databases: {', '.join(sorted(names))}")
    if audit.max_bytes < 0:
        raise ConfigError("audit.max_bytes", "cannot be negative (0: never rotate)")
    if audit.backups < 0:
        raise ConfigError("audit.backups", "cannot be negative")
    if audit.queue_size < 1:
        raise ConfigError("audit.queue_size", "must be at least 1")
    if audit.retry_interval <= 0:
        raise ConfigError("audit.retry_interval", "must be more than 0s")


SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def server_tls(tls: Tls) -> ssl.SSLContext:
    """The TLS context pgfleet offers clients (listen.tls)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for field in ("cert", "key"):
        if not Path(getattr(tls, field)).is_file():
            raise ConfigError(f"listen.tls.{field}", f"no such file: {getattr(tls, field)}")
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError("listen.tls.cert", f"cannot load the certificate and key: {exc}") from None
    return context
