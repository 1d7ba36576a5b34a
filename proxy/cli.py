"""The command line: ``pgfleet run | check | keys new | tenants encrypt | tenants key | demo | --version``.

Owns argument parsing and turning expected failures (a bad config, a port in use) into one
line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

from . import __version__
from .config import Config, load, load_text, parse_dsn, read_config
from .errors import ConfigError
from .supervisor import unsplittable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pgfleet", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pgfleet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve the fleet")
    run.add_argument("--config", help="YAML config file (default: the DB_* environment variables)")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--workers", type=int, default=1,
                     help="worker processes sharing the port (SO_REUSEPORT), each with its share of every "
                          "pool; default 1: one process, no supervisor (docs/workers.md)")
    # Set by the supervisor on the workers it starts (pgfleet run --workers N).
    run.add_argument("--worker", help=argparse.SUPPRESS)
    run.add_argument("--group", help=argparse.SUPPRESS)
    run.add_argument("--supervisor-fd", type=int, help=argparse.SUPPRESS)
    check = sub.add_parser("check", help="validate a config and print the routing map")
    check.add_argument("--config", help="YAML config file")
    check.add_argument("--offline", action="store_true",
                       help="do not connect to the databases (skips the backend role checks)")
    rls = sub.add_parser("rls", help="print (or --apply on every shard) the row-level security policies "
                                     "that keep database keys to their own rows")
    rls.add_argument("--config", help="YAML config file")
    rls.add_argument("--apply", action="store_true", help="run them on every shard as the dsn's user")
    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_sub.add_parser("new", help="print a new key id, secret and SCRAM verifier")
    new.add_argument("--role", required=True, choices=["admin", "server", "client", "database"])
    tenants = sub.add_parser("tenants", help="the tenant directory's passwords (docs/directory.md)")
    tenants_sub = tenants.add_subparsers(dest="tenants_command", required=True)
    encrypt = tenants_sub.add_parser("encrypt", help="read one password on stdin, print its ciphertext for the "
                                                     "registry's password column")
    encrypt.add_argument("--config", help="YAML config file whose directory.encryption_key to use")
    encrypt.add_argument("--key", help="the key (default: $DB_ENCRYPTION_KEY, or --config's)")
    tenants_sub.add_parser("key", help="print a new encryption key for directory.encryption_key")
    sub.add_parser("demo", help="start three embedded clusters and pgfleet on them")
    args, rest = parser.parse_known_args(argv)
    group = None  # run --worker i/N: this worker's place in its group (admin/group.py)
    if args.command == "demo":
        from . import demo
        return demo.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "keys":
        from .auth.keys import new_key
        key_id, secret, verifier = new_key(args.role)
        print(f"id:       {key_id}\nsecret:   {secret}\nverifier: {verifier}\n")
        print(f'config:   - {{id: {key_id}, secret: "{verifier}", role: {args.role}}}')
        return 0
    if args.command == "tenants":
        return _tenants(args)
    try:
        if args.command == "run" and args.group is not None:
            # A worker of a group runs the config its group runs (supervisor.py), which a
            # restarted worker must share even if the file was edited and not reloaded since.
            from .admin.group import Group
            worker, workers = (int(n) for n in args.worker.split("/"))
            group = Group(args.group, worker, workers)
            config = load_text(group.running_config(), source=args.config or "environment")
        else:
            config = load(args.config)
        if args.command == "check":
            from .auth.keys import load_keys
            load_keys(config)  # verifiers must parse too
            print(describe(config))
            if not args.offline:
                from .admin.rls import role_warnings
                from .admin.sequences import read as read_sequences
                for line in asyncio.run(role_warnings(config)):
                    print(line)
                sequences, problems = asyncio.run(read_sequences(config))
                for database, why in problems:
                    print(f"note: cannot read the sequences of database {database}: {why}")
                for seq in sequences:
                    if seq.fix:
                        print(f"warning: sequence {seq.sequence} of sharded table {seq.table} on {seq.database} "
                              f"overlaps the other shards' ids (increment {seq.increment}, start {seq.start}): "
                              f"run there: {seq.fix}")
            return 0
        if args.command == "rls":
            return _rls(config, args.apply)
    except ConfigError as exc:
        print(f"pgfleet: invalid config: {exc}", file=sys.stderr)
        return 2
    where = f"[worker {group.worker}]" if group is not None else ""
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s{where}: %(message)s")
    if args.workers != 1 and group is None:
        return _supervise(config, args)
    from .admin.group import GroupError
    from .server import install_loop, serve
    install_loop()
    if group is not None:
        # Until it serves, a worker ignores SIGHUP: it starts with the group's newest config anyway.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        asyncio.run(serve(config, args.config, group, args.supervisor_fd))
    except GroupError as exc:
        print(f"pgfleet: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"pgfleet: cannot listen on {config.listen.host}:{config.listen.port}: {exc.strerror}",
              file=sys.stderr)
        return 1
    except ConfigError as exc:  # found at start: an audit file that cannot be opened, ...
        print(f"pgfleet: invalid config: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def _tenants(args: argparse.Namespace) -> int:
    """``pgfleet tenants key`` and ``pgfleet tenants encrypt``."""
    from .directory.registry import Crypto, new_key
    if args.tenants_command == "key":
        print(new_key())
        return 0
    key = args.key or os.environ.get("DB_ENCRYPTION_KEY")
    try:
        if key is None and args.config:
            directory = load(args.config).directory
            key = directory.encryption_key if directory is not None else None
        if not key:
            print("pgfleet: no encryption key: give --key, set DB_ENCRYPTION_KEY, or --config with "
                  "directory.encryption_key (`pgfleet tenants key` makes one)", file=sys.stderr)
            return 2
        crypto = Crypto(key)
    except ConfigError as exc:
        print(f"pgfleet: invalid config: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"pgfleet: invalid encryption key: {exc}", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        import getpass
        password = getpass.getpass("password: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("pgfleet: no password on stdin", file=sys.stderr)
        return 2
    print(crypto.encrypt(password))
    return 0


def _supervise(config: Config, args: argparse.Namespace) -> int:
    """pgfleet run --workers N: the supervisor (supervisor.py)."""
    from .admin.group import MAX_WORKERS
    from .supervisor import run
    if not 1 <= args.workers <= MAX_WORKERS:
        print(f"pgfleet: --workers must be between 1 and {MAX_WORKERS}, not {args.workers}", file=sys.stderr)
        return 2
    small = unsplittable(config, args.workers)
    if small:
        print(f"pgfleet: --workers {args.workers} splits every pool size and client limit over the workers, "
              f"each taking at least 1, and these are smaller: {'; '.join(small)}. Raise them to at least "
              f"{args.workers} or run fewer workers", file=sys.stderr)
        return 2
    # The workers bind with SO_REUSEPORT, which another process of this user with the same
    # option would share silently: the port must be free before they start.
    ports = [(config.listen.host, config.listen.port)]
    if config.http is not None:
        ports.append((config.http.host, config.http.port))
    for host, port in ports:
        try:
            with socket.create_server((host, port)):
                pass
        except OSError as exc:
            print(f"pgfleet: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
            return 1
    arguments = ["--log-level", args.log_level] + (["--config", args.config] if args.config else [])
    try:
        return run(args.workers, arguments, read_config(args.config), f"{config.listen.host}:{config.listen.port}")
    except KeyboardInterrupt:
        return 0


def _rls(config: Config, apply: bool) -> int:
    from .admin.rls import RlsError, bypass_sql, plan, roles
    from .admin.rls import apply as apply_rls

    try:
        statements, warnings = asyncio.run(plan(config))
        for line in warnings:
            print(f"pgfleet rls: warning: {line}", file=sys.stderr)
        if not apply:
            bypass = bypass_sql(roles(config))
            for shard, sql in statements.items():
                print(f"-- on {shard} ({config.dsn(shard).safe()}), as its dsn's user:")
                print("\n".join(bypass + sql) if sql else "-- (no sharded table there yet)")
            return 0
        for line in asyncio.run(apply_rls(config, statements)):
            print(f"pgfleet rls: warning: {line}", file=sys.stderr)
    except RlsError as exc:
        print(f"pgfleet rls: {exc}", file=sys.stderr)
        return 1
    for shard, sql in statements.items():
        tables = [line.split()[2] for line in sql if line.startswith("ALTER TABLE")]
        print(f"{shard}: row-level security on {', '.join(tables) or 'no table yet'}")
    return 0


def describe(config: Config) -> str:
    """The resolved routing map for ``pgfleet check``: names and addresses, never secrets."""
    lines = [(f"listen {config.listen.host}:{config.listen.port} fleet database {config.listen.database!r}"
              f" (auth {config.listen.auth})"),
             (f"pool mode={config.pool.mode} size={config.pool.size}"
              f" acquire_timeout={config.pool.acquire_timeout:g}s idle_timeout={config.pool.idle_timeout:g}s"
              f" lifetime={config.pool.lifetime:g}s"),
             "databases:"]
    for name in config.databases:
        mark = " (default)" if name == config.default_database else ""
        lines.append(f"  {name}{mark}: {config.dsn(name).safe()}")
    if config.tables:
        lines.append("tables:")
        lines.extend(f"  {table} -> {db}" for table, db in sorted(config.tables.items()))
    if config.sharding.tables:
        lines.append(f"sharding ({config.sharding.function}) over {', '.join(config.sharding.shards)}:")
        lines.extend(f"  {table} by {col}" for table, col in sorted(config.sharding.tables.items()))
    lines.append(f"everything else -> {config.default_database}")
    directory = config.directory
    if directory is not None:
        source = f"table {directory.table}" if directory.table is not None else "its query"
        cap = directory.max_backends_per_host
        lines.append(f"tenant directory: {source} in {directory.registry}, pools of {directory.pool_size} opened "
                     f"on first use, closed after {directory.idle_timeout:g}s idle, "
                     f"{f'at most {cap} backends per host' if cap else 'no cap per host'}")
        lines.extend(f"  host {name}: {parse_dsn(dsn, name).safe()}" for name, dsn in directory.hosts.items())
    lines.append("keys:")
    for key in config.keys:
        extra = []
        if key.databases is not None:
            extra.append(f"databases={','.join(key.databases)}")
        if key.read_only:
            extra.append("read_only")
        role = config.backend_role_of(key)
        extra.append(f"runs as {role}" if role is not None else "runs as the dsn's user")
        if key.policy is not None:
            extra.append("own policy")
        lines.append(f"  {key.id} ({key.role}){' ' + ' '.join(extra) if extra else ''}")
    return "\n".join(lines)
