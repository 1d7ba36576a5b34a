"""A key's statement policy: which statement kinds, functions and tables its SQL may use.

Owns the default rules per key role and their compilation with a key's own ``policy:`` into a
``KeyPolicy``, and the check of one analysed statement against it. The parser
(``parse.py``) records what each statement does (``Statement.acts``), which functions it calls
and which relations it names, once per statement text; the router checks a route's analysis
here when it first computes the route for a key, and keeps the route, so a statement the key
ran before costs nothing more. A refusal is a 42501 that names the key and the rule.

This is the second line of a tenant's isolation (the router's own checks are the first); the
backend role a key runs as and row-level security are the ones PostgreSQL enforces
(docs/security.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..config import Policy
from ..errors import INSUFFICIENT_PRIVILEGE, ClientError
from .route import Analysis, Relation, Statement

# What the statements of database and client keys may not do unless their policy allows it.
TENANT_DENIED_STATEMENTS = frozenset({
    "ddl", "create_function", "do", "alter_system", "load", "copy_program", "copy_file", "set_role", "set_parser",
    "lock", "maintenance",
})

# The server's file, program, process, large-object, replication and remote-SQL functions,
# and those that run SQL text the router cannot see: a name, or a prefix ending in "*".
TENANT_DENIED_FUNCTIONS = (
    "pg_read_file", "pg_read_binary_file", "pg_stat_file", "pg_ls_*", "pg_file_*", "pg_logdir_ls",
    "pg_current_logfile", "lo_*", "loread", "lowrite", "pg_terminate_backend", "pg_cancel_backend",
    "pg_reload_conf", "pg_rotate_logfile", "pg_promote", "pg_switch_wal", "pg_create_restore_point",
    "pg_start_backup", "pg_stop_backup", "pg_backup_*", "pg_wal_replay_*", "pg_log_backend_memory_contexts",
    "pg_create_physical_replication_slot", "pg_create_logical_replication_slot", "pg_drop_replication_slot",
    "pg_copy_physical_replication_slot", "pg_copy_logical_replication_slot", "pg_replication_slot_advance",
    "pg_logical_*", "pg_replication_origin_*", "pg_import_system_collations", "pg_stat_get_activity",
    "pg_stat_get_backend_*", "pg_stat_reset*", "pg_stat_statements*", "dblink*", "query_to_xml*",
    "table_to_xml*", "cursor_to_xml*", "schema_to_xml*", "database_to_xml*", "ts_stat", "ts_rewrite",
    "crosstab*", "connectby*", "xpath_table", "pg_blocking_pids", "pg_safe_snapshot_blocking_pids",
)

# Catalogs that show other roles' secrets, other sessions' statements or the server's files.
TENANT_DENIED_TABLES = frozenset({
    "pg_authid", "pg_shadow", "pg_user_mapping", "pg_user_mappings", "pg_stat_activity", "pg_stat_statements",
    "pg_stat_statements_info", "pg_file_settings", "pg_hba_file_rules", "pg_ident_file_mappings",
    "pg_largeobject", "pg_largeobject_metadata", "pg_stat_replication", "pg_replication_slots",
    "pg_stat_ssl", "pg_stat_gssapi", "pg_stat_subscription", "pg_stat_wal_receiver",
    # what the shared backends hold from other clients: their prepared statements, cursors, locks
    "pg_prepared_statements", "pg_cursors", "pg_locks", "pg_stat_progress_vacuum", "pg_stat_progress_analyze",
    "pg_stat_progress_create_index", "pg_stat_progress_cluster", "pg_stat_progress_basebackup",
    "pg_stat_progress_copy",
})

_CATALOG_SCHEMAS = ("pg_catalog", "information_schema")


@dataclass(frozen=True, slots=True)
class _Names:
    """Function or table names: exact ones, and prefixes (written with a trailing ``*``)."""

    exact: frozenset[str]
    prefixes: tuple[str, ...]

    @classmethod
    def of(cls, names: Iterable[str], bare: bool = True) -> _Names:
        """``bare``: a qualified name also matches its bare name (what search_path may find);
        for denials, never for what a policy allows. pg_catalog's names are bare anyway, as
        the parser records them."""
        names = [name.lower().removeprefix("pg_catalog.") for name in names]
        if bare:
            names += [name.rpartition(".")[2] for name in names if "." in name]
        return cls(frozenset(name for name in names if not name.endswith("*")),
                   tuple(sorted(name[:-1] for name in names if name.endswith("*"))))

    def __contains__(self, name: object) -> bool:
        return name in self.exact or (bool(self.prefixes) and name.startswith(self.prefixes))  # type: ignore[attr-defined]

    def __bool__(self) -> bool:
        return bool(self.exact or self.prefixes)

    def words(self) -> list[str]:
        return sorted(self.exact) + [prefix + "*" for prefix in self.prefixes]


_DEFAULT_FUNCTIONS = _Names.of(TENANT_DENIED_FUNCTIONS)


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """What one key's statements may not do, compiled once per key at load."""

    denied_statements: frozenset[str]
    denied_functions: _Names
    allowed_functions: _Names
    denied_tables: _Names
    allowed_tables: _Names | None  # only these (catalogs aside), when given

    def describe(self) -> str:
        """One line for SHOW KEYS: what is denied beyond PostgreSQL's own privileges."""
        parts = []
        if self.denied_statements:
            parts.append("statements -" + ",".join(sorted(self.denied_statements)))
        functions = [f for f in self.denied_functions.words() if f not in self.allowed_functions]
        if functions:
            parts.append(f"functions -{len(functions)}" if len(functions) > 6 else "functions -" + ",".join(functions))
        tables = self.denied_tables.words()
        if tables:
            parts.append(f"tables -{len(tables)}" if len(tables) > 6 else "tables -" + ",".join(tables))
        if self.allowed_tables is not None:
            parts.append("tables only " + ",".join(self.allowed_tables.words()))
        return "; ".join(parts) or "none"


def compile_policy(role: str, own: Policy | None) -> KeyPolicy | None:
    """A key's policy: its role's defaults, widened and narrowed by its own ``policy:``.

    None: nothing to check (admin keys, and server keys without a policy of their own; the
    backend role they run as decides what PostgreSQL lets them do)."""
    if role == "admin" or (role == "server" and own is None):
        return None
    tenant = role in ("database", "client")
    statements = set(TENANT_DENIED_STATEMENTS if tenant else ())
    functions = list(TENANT_DENIED_FUNCTIONS if tenant else ())
    tables = set(TENANT_DENIED_TABLES if tenant else ())
    allowed_functions: list[str] = []
    allowed_tables: _Names | None = None
    if own is not None:
        statements.difference_update(own.statements.allow)
        statements.update(own.statements.deny)
        functions.extend(own.functions.deny)
        allowed_functions.extend(own.functions.allow)
        tables.difference_update(name.lower() for name in own.tables.allow)
        tables.update(own.tables.deny)
        if own.tables.allow:
            allowed_tables = _Names.of(own.tables.allow, bare=False)
    # A function both denied by default and allowed by the key's policy is allowed; one the
    # key's own deny names stays denied whatever its allow says.
    own_denied = _Names.of(own.functions.deny if own is not None else ())
    allowed = _Names.of((name for name in allowed_functions if name not in own_denied), bare=False)
    return KeyPolicy(frozenset(statements), _Names.of(functions), allowed, _Names.of(tables), allowed_tables)


def check(policy: KeyPolicy, analysis: Analysis, key_id: str, role: str) -> None:
    """Raise 42501 if a statement of ``analysis`` breaks ``policy``."""
    for stmt in analysis.statements:
        denied = stmt.acts & policy.denied_statements
        if denied:
            rule = min(denied)
            raise ClientError(INSUFFICIENT_PRIVILEGE,
                              f"key {key_id} ({role}) may not {_doing(rule, stmt)}: refused by its policy "
                              f"(statements: {rule})",
                              hint=f"use a key whose policy allows it (policy: {{statements: {{allow: [{rule}]}}}})")
        if stmt.functions:
            _check_functions(policy, stmt, key_id, role)
        if stmt.relations and (policy.denied_tables or policy.allowed_tables is not None):
            _check_tables(policy, stmt, key_id, role)


def _check_functions(policy: KeyPolicy, stmt: Statement, key_id: str, role: str) -> None:
    for name in sorted(stmt.functions):
        base = name.rpartition(".")[2]
        if (base in policy.denied_functions or name in policy.denied_functions) \
                and base not in policy.allowed_functions and name not in policy.allowed_functions:
            hint = ("the server's file, program, process and large-object functions are for admin keys"
                    if base in _DEFAULT_FUNCTIONS else "the key's policy.functions.deny names it")
            raise ClientError(INSUFFICIENT_PRIVILEGE,
                              f"key {key_id} ({role}) may not call {name}(): refused by its policy (functions: {base})",
                              hint=hint)


def _check_tables(policy: KeyPolicy, stmt: Statement, key_id: str, role: str) -> None:
    for relation in stmt.relations:  # the common case: none refused, in no particular order
        if _table_refused(policy, relation):
            break
    else:
        return
    for relation in sorted(stmt.relations, key=lambda r: r.qualified):  # the first refused, by name
        _refuse_table(policy, relation, key_id, role)


def _table_refused(policy: KeyPolicy, relation: Relation) -> bool:
    name = relation.name.lower()
    if name in policy.denied_tables or relation.qualified.lower() in policy.denied_tables:
        return True
    allowed = policy.allowed_tables
    if allowed is None or name in allowed or relation.qualified.lower() in allowed:
        return False
    return not (relation.schema in _CATALOG_SCHEMAS if relation.schema is not None else name.startswith("pg_"))


def _refuse_table(policy: KeyPolicy, relation: Relation, key_id: str, role: str) -> None:
    name = relation.name.lower()
    if name in policy.denied_tables or relation.qualified.lower() in policy.denied_tables:
        raise ClientError(INSUFFICIENT_PRIVILEGE,
                          f"key {key_id} ({role}) may not use table {relation.qualified}: refused by its policy "
                          f"(tables: {name})", hint="it shows other roles' or sessions' data: use an admin key"
                          if name in TENANT_DENIED_TABLES else "the key's policy.tables.deny names it")
    allowed = policy.allowed_tables
    if allowed is not None and _table_refused(policy, relation):
        raise ClientError(INSUFFICIENT_PRIVILEGE,
                          f"key {key_id} ({role}) may not use table {relation.qualified}: refused by its policy "
                          f"(tables: only {', '.join(allowed.words())})",
                          hint="add the table to the key's policy.tables.allow, or use another key")


_DOING = {
    "select": "read with SELECT", "insert": "run INSERT", "update": "run UPDATE", "delete": "run DELETE",
    "merge": "run MERGE", "copy": "run COPY", "call": "call procedures", "create_function":
    "create functions or procedures", "do": "run DO blocks", "alter_system": "run ALTER SYSTEM",
    "load": "LOAD libraries", "copy_program": "run COPY to or from a program", "copy_file":
    "run COPY to or from a server file", "set_role": "change its identity (SET ROLE, SET SESSION "
    "AUTHORIZATION, set_config of role or pgfleet.*)", "set_parser": "change how SQL text is read "
    "(standard_conforming_strings off, or a client_encoding such as SJIS or GBK)", "lock": "run LOCK TABLE", "maintenance":
    "run VACUUM, ANALYZE, CLUSTER, REINDEX or CHECKPOINT",
}


def _doing(rule: str, stmt: Statement) -> str:
    if rule == "ddl":
        return f"run DDL ({stmt.command})"
    return _DOING.get(rule, f"run {stmt.command}")
