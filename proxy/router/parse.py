"""The only module that imports pglast: statement text -> ``Analysis``, and the other values
pgfleet reads from SQL text.

``analyze`` uses ``parse_sql_json`` (libpg_query's JSON output) rather than building pglast's
Python AST, because that is 5-20x faster (DESIGN "Performance stance"). It classifies each
statement and collects the relations it names, leaving out CTE names. It never decides a
route; that is ``router.router``'s job.

Whoever else needs the parser asks here, so that pglast's API and its cost are in one file:
``copyrows`` for the COPY statements it splits (``copy_from_stdin``, ``copy_to_stdout``), the
session for multi-row INSERTs that span shards (``split_insert``), the router for fan-out
plans (``fanout_plan``), and the audit log for normalised text and fingerprints
(``normalized``, ``fingerprinted``, called from its writer's thread, never on a statement's
path).
"""

from __future__ import annotations

import bisect
import functools
import re
from collections.abc import Mapping
from typing import Any

import msgspec
from msgspec.structs import replace
from pglast import ast as pg
from pglast import parse_sql
from pglast.parser import ParseError, fingerprint, normalize, parse_sql_json
from pglast.parser import scan as scan_tokens
from pglast.stream import RawStream
from pglast.visitors import Visitor

from . import keybind
from .fanout import FanoutPlan, Unmergeable, plan_fanout
from .keybind import const_text
from .route import (
    HINT_NAMES,
    LIST_QUOTE,
    PARSER_SETTINGS,
    Analysis,
    Hints,
    Kind,
    Relation,
    SettingChange,
    Statement,
    TransactionStatement,
    parser_setting_safe,
)

_READ = {"SelectStmt": "SELECT", "ExplainStmt": "EXPLAIN", "VariableShowStmt": "SHOW",
         "FetchStmt": "FETCH", "ClosePortalStmt": "CLOSE CURSOR", "DeclareCursorStmt": "DECLARE CURSOR"}
_WRITE = {"InsertStmt": "INSERT", "UpdateStmt": "UPDATE", "DeleteStmt": "DELETE",
          "MergeStmt": "MERGE", "CallStmt": "CALL", "DoStmt": "DO"}
_SESSION = {"VariableSetStmt": "SET", "DiscardStmt": "DISCARD", "ListenStmt": "LISTEN",
            "UnlistenStmt": "UNLISTEN", "NotifyStmt": "NOTIFY", "PrepareStmt": "PREPARE",
            "ExecuteStmt": "EXECUTE", "DeallocateStmt": "DEALLOCATE", "LoadStmt": "LOAD"}
_READ_ONLY_GUCS = {"default_transaction_read_only", "transaction_read_only"}
_CATALOG_SCHEMAS = {"pg_catalog", "information_schema"}


# Built-in functions that never write: a SELECT calling only these may run on a replica.
_REPLICA_FUNCTIONS = frozenset("""
count sum avg min max bool_and bool_or every array_agg string_agg json_agg jsonb_agg json_object_agg
jsonb_object_agg stddev stddev_pop stddev_samp variance var_pop var_samp percentile_cont percentile_disc mode
now statement_timestamp clock_timestamp transaction_timestamp timeofday date_trunc date_part extract age
to_char to_date to_timestamp to_number make_date make_time make_timestamp make_interval justify_days
justify_hours isfinite lower upper length char_length octet_length bit_length substr substring trim btrim
ltrim rtrim lpad rpad replace split_part concat concat_ws left right reverse repeat position strpos
starts_with initcap format md5 sha256 encode decode regexp_replace regexp_match regexp_matches
regexp_split_to_array regexp_split_to_table translate quote_ident quote_literal quote_nullable abs ceil
ceiling floor round trunc sign sqrt cbrt power pow mod ln log log10 exp greatest least random width_bucket
div pi degrees radians json_build_object jsonb_build_object json_build_array jsonb_build_array to_json
to_jsonb row_to_json jsonb_set jsonb_insert jsonb_strip_nulls jsonb_extract_path jsonb_extract_path_text
json_extract_path json_extract_path_text jsonb_array_length json_array_length jsonb_typeof json_typeof
jsonb_pretty jsonb_each jsonb_each_text jsonb_array_elements jsonb_array_elements_text jsonb_object_keys
array_length array_to_string array_position array_positions array_append array_prepend array_cat
array_remove array_replace unnest generate_series cardinality string_to_array current_database
current_schema current_schemas current_setting version pg_size_pretty pg_database_size pg_relation_size
pg_total_relation_size pg_table_size pg_indexes_size gen_random_uuid row_number rank dense_rank
percent_rank cume_dist ntile lag lead first_value last_value nth_value pg_is_in_recovery inet_server_port
inet_server_addr
""".split())  # noqa: SIM905 - a word list reads better as text
_NO_SHARDS: Mapping[str, str] = {}
_decode = msgspec.json.Decoder().decode  # 2-3x json.loads on libpg_query's JSON
# A leading comment /* pgfleet: name=value ... */ (after blanks or other leading comments' ends).
_HINT = re.compile(r"\A\s*/\*\s*pgfleet\s*:(.*?)\*/", re.DOTALL)
_PRIMARY = re.compile(r"\A\s*/\*\s*pgfleet\s*:\s*primary\s*\*/", re.IGNORECASE)
_HINT_PAIR = re.compile(r"\s*([A-Za-z_]+)\s*=\s*('(?:[^']|'')*'|[^\s']+)\s*")


def analyze(sql: str, sharded: Mapping[str, str] = _NO_SHARDS) -> Analysis:
    """The analysis of one query string; ``sharded`` maps sharded tables to their key column."""
    try:
        tree = _decode(parse_sql_json(sql))
    except ParseError as exc:
        return Analysis((), syntax_error=str(exc))
    stmts = tuple(_statement(raw["stmt"], sharded) for raw in tree.get("stmts", ()) if "stmt" in raw)
    if "pgfleet" not in sql:
        return Analysis(stmts)
    if _PRIMARY.match(sql):
        return Analysis(stmts, primary=True)
    hints, hint_error = _hints(sql)
    return Analysis(stmts, hints=hints, hint_error=hint_error)


def _hints(sql: str) -> tuple[Hints | None, str | None]:
    found = _HINT.match(sql)
    if found is None:
        return None, None
    text = found.group(1)
    values: dict[str, str] = {}
    pos = 0
    while pos < len(text.rstrip()):
        pair = _HINT_PAIR.match(text, pos)
        if pair is None:
            return None, f"cannot read the pgfleet hint {text.strip()!r}: write name=value pairs"
        name, value = pair.group(1).lower(), pair.group(2)
        if value.startswith("'"):
            value = value[1:-1].replace("''", "'")
        if name not in HINT_NAMES:
            return None, f"unknown pgfleet hint {name!r}: use {', '.join(HINT_NAMES)}"
        values[name] = value
        pos = pair.end()
    try:
        return hints_from(values), None
    except ValueError as exc:
        return None, str(exc)


def hints_from(values: Mapping[str, str]) -> Hints:
    """Hints from name=value text (a comment's pairs, or the session's pgfleet.* settings)."""
    shard = values.get("shard")
    if shard is not None and not shard.strip().isdigit():
        raise ValueError(f"pgfleet hint shard={shard!r} must be a shard number (0, 1, ...)")
    databases = values.get("databases")
    return Hints(shard_key=values.get("shard_key"), shard=int(shard) if shard is not None else None,
                 database=values.get("database"),
                 databases=tuple(d.strip() for d in databases.split(",") if d.strip())
                 if databases is not None else None)


def _statement(node: dict[str, Any], sharded: Mapping[str, str]) -> Statement:
    relations, calls, levels, state, functions = _scan(node)
    stmt = _classify(node, relations)
    (tag, body), = node.items()
    if stmt.kind is Kind.READ and tag == "SelectStmt" and not state and functions <= _REPLICA_FUNCTIONS:
        stmt = replace(stmt, replica_safe=True)
    pins, unpins = _session_state(tag, body, state)
    if pins or unpins:
        stmt = replace(stmt, pins=pins, unpins=unpins)
    if tag == "DropdbStmt" or (tag == "RenameStmt" and body.get("renameType") == "OBJECT_DATABASE"):
        stmt = replace(stmt, closes_database=body.get("dbname") or body.get("subname"))
    changes, opaque = _setting_changes(tag, body, calls)
    rollback = tag == "TransactionStmt" and body.get("kind") == "TRANS_STMT_ROLLBACK"
    if tag in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt", "CreateStmt"):  # CreateStmt: CREATE TABLE
        stmt = replace(stmt, target=body.get("relation", {}).get("relname"))
    if sharded and stmt.kind is not Kind.SESSION and stmt.kind is not Kind.TRANSACTION \
            and any(r.name in sharded for r in stmt.relations):
        placement = keybind.placement(node, sharded, levels)
        insert = keybind.insert_keys(body, sharded) if tag == "InsertStmt" else None
        moves = tag == "UpdateStmt" and keybind.updates_key(body, sharded)
        # The shape only words a fan-out's refusal: a SELECT with an unbound sharded table.
        shape = _shape(body) if tag == "SelectStmt" and any(
            o.values is None for o in placement.occurrences) else ""
        stmt = replace(stmt, placement=placement, insert=insert, moves_rows=moves, shape=shape)
    acts = _acts(node)
    if any(_changes_identity(call.get("args", ())) for call in calls):
        acts = acts | {"set_role"}
    if any(_changes_parser(call.get("args", ())) for call in calls):
        acts = acts | {"set_parser"}
    if not (changes or opaque or rollback):
        return replace(stmt, acts=acts, functions=frozenset(f.lower() for f in functions))
    violation = stmt.read_only_violation or opaque or any(
        change.name is None or change.name in _READ_ONLY_GUCS for change in changes)
    return replace(stmt, read_only_violation=violation, settings=changes, opaque_settings=opaque,
                   rollback=rollback, acts=acts, functions=frozenset(f.lower() for f in functions))


# Statement kinds of a key's policy (config.STATEMENT_KINDS) by parse-tree tag; DDL is the
# rest of the *Stmt tags that _classify calls DDL.
_ACTS = {"SelectStmt": "select", "InsertStmt": "insert", "UpdateStmt": "update", "DeleteStmt": "delete",
         "MergeStmt": "merge", "CallStmt": "call", "DoStmt": "do", "AlterSystemStmt": "alter_system",
         "LoadStmt": "load", "LockStmt": "lock", "VacuumStmt": "maintenance", "ClusterStmt": "maintenance",
         "ReindexStmt": "maintenance", "CheckPointStmt": "maintenance"}
_NOT_DDL = frozenset({*_ACTS, *_READ, *_SESSION, "CopyStmt", "TransactionStmt", "ExplainStmt", "PrepareStmt",
                      "ConstraintsSetStmt"})
_IDENTITY = frozenset({"role", "session_authorization"})
# Settings that hold for the current transaction only, never for a session.
_TRANSACTION_SCOPED = frozenset({"transaction_isolation", "transaction_read_only", "transaction_deferrable"})
_NAMED_STATEMENTS = frozenset({"PrepareStmt", "ExecuteStmt", "DeallocateStmt"})


def _acts(node: dict[str, Any]) -> frozenset[str]:
    """What a statement does, in policy kinds, with the statements nested in it."""
    acts: set[str] = set()
    stack = [node]
    while stack:
        (tag, body), = stack.pop().items()
        act = _ACTS.get(tag)
        if act is not None:
            if act != "select" or "valuesLists" not in body:  # VALUES lists read nothing
                acts.add(act)
        elif tag == "CopyStmt":
            acts.add("copy")
            if body.get("is_program"):
                acts.add("copy_program")
            elif body.get("filename"):
                acts.add("copy_file")
        elif tag == "CreateFunctionStmt":
            acts.update(("ddl", "create_function"))
        elif tag in _NAMED_STATEMENTS:
            if (body.get("name") or "").startswith("pgfleet_"):
                acts.add("pgfleet_statement")  # the backend-side names pgfleet shares between clients
        elif tag == "VariableSetStmt":
            name = (body.get("name") or "").lower()
            if name in _IDENTITY or name.startswith("pgfleet."):  # SET LOCAL pgfleet.tenant too
                acts.add("set_role")
            elif name in PARSER_SETTINGS and body.get("kind") not in ("VAR_RESET", "VAR_SET_DEFAULT") \
                    and not parser_setting_safe(name, _set_value(name, body.get("args", ()))):
                acts.add("set_parser")
        elif tag not in _NOT_DDL and tag.endswith("Stmt"):
            acts.add("ddl")
        if tag == "SelectStmt" and "intoClause" in body:
            acts.add("ddl")  # SELECT ... INTO creates a table
        for field in ("query", "selectStmt"):  # EXPLAIN, PREPARE, DECLARE, COPY (...), CTAS, INSERT
            inner = body.get(field)
            if isinstance(inner, dict) and len(inner) == 1:
                stack.append(inner)
        for cte in body.get("withClause", {}).get("ctes", ()):
            query = cte.get("CommonTableExpr", {}).get("ctequery")
            if isinstance(query, dict):
                stack.append(query)
        for arm in ("larg", "rarg"):
            if arm in body:
                stack.append({"SelectStmt": body[arm]})
    return frozenset(acts)


def _changes_parser(args: Any) -> bool:
    """set_config() of standard_conforming_strings or client_encoding to a value that would make
    PostgreSQL read SQL text differently from pgfleet."""
    name = const_text(args[0]) if args else None
    if name is None or name.lower() not in PARSER_SETTINGS:
        return False  # a computed name is set_role's already
    return not parser_setting_safe(name.lower(), const_text(args[1]) if len(args) > 1 else None)


def _changes_identity(args: Any) -> bool:
    """set_config() of role, session_authorization or pgfleet.*, or of a name computed at run
    time (which could be any of them)."""
    name = const_text(args[0]) if args else None
    if name is None:
        return True
    name = name.lower()
    return name in _IDENTITY or name.startswith("pgfleet.")


# Session-level advisory locks: held by the backend past the transaction.
_SESSION_LOCKS = frozenset({"pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock",
                            "pg_try_advisory_lock_shared"})
_CURSOR_OPT_HOLD = 0x0020
_DISCARDS = {"DISCARD_ALL": ("*",), "DISCARD_TEMP": ("temporary table",)}


def _session_state(tag: str, body: dict[str, Any], state: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What session state a statement leaves on its backend that another backend would not
    have (the client must keep that backend), and what state it drops ("*": all of it)."""
    pins = set(state)
    unpins: tuple[str, ...] = ()
    if tag == "ListenStmt":
        pins.add("LISTEN")
    elif tag == "PrepareStmt":
        pins.add("PREPARE")
    elif tag == "DeclareCursorStmt" and body.get("options", 0) & _CURSOR_OPT_HOLD:
        pins.add("a cursor WITH HOLD")
    elif tag == "UnlistenStmt" and "conditionname" not in body:
        unpins = ("LISTEN",)
    elif tag == "DeallocateStmt" and body.get("isall"):
        unpins = ("PREPARE",)
    elif tag == "ClosePortalStmt" and "portalname" not in body:
        unpins = ("a cursor WITH HOLD",)
    elif tag == "DiscardStmt":
        unpins = _DISCARDS.get(body.get("target", ""), ())
    if "pg_advisory_unlock_all" in state:
        pins.discard("pg_advisory_unlock_all")
        unpins = ("an advisory lock",)
    return tuple(sorted(pins)), unpins


def _classify(node: dict[str, Any], relations: frozenset[Relation]) -> Statement:
    (tag, body), = node.items()
    if tag == "SelectStmt":
        writes = "intoClause" in body or "lockingClause" in body or _modifying_cte(body)
        return Statement(Kind.WRITE if writes else Kind.READ, "SELECT", relations)
    if tag in _READ:
        if tag == "ExplainStmt" and _explain_analyzes_write(body):
            return Statement(Kind.WRITE, "EXPLAIN", relations)
        return Statement(Kind.READ, _READ[tag], relations)
    if tag in _WRITE:
        return Statement(Kind.WRITE, _WRITE[tag], relations)
    if tag == "CopyStmt":
        return Statement(Kind.WRITE if body.get("is_from") else Kind.READ, "COPY", relations)
    if tag == "TransactionStmt":
        violation = any(_option_sets_read_write(opt) for opt in body.get("options", ()))
        return Statement(Kind.TRANSACTION, "TRANSACTION", relations, violation,
                         transaction=TransactionStatement(body.get("kind", "").removeprefix("TRANS_STMT_")))
    if tag in _SESSION:
        violation = tag == "VariableSetStmt" and (
            body.get("name") in _READ_ONLY_GUCS  # SET default_transaction_read_only ...
            or any(_option_sets_read_write(arg) for arg in body.get("args", ())))  # SET TRANSACTION ...
        return Statement(Kind.SESSION, _SESSION[tag], relations, violation)
    if tag == "DropStmt" and body.get("removeType") in ("OBJECT_TABLE", "OBJECT_VIEW",
                                                        "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE"):
        return Statement(Kind.DDL, "DROP", relations | frozenset(_dropped(body)))
    if tag.endswith("Stmt") and tag not in ("VacuumStmt", "CheckPointStmt", "LockStmt"):
        return Statement(Kind.DDL, tag.removesuffix("Stmt").upper(), relations)
    return Statement(Kind.OTHER, tag.removesuffix("Stmt").upper(), relations)


def _setting_changes(tag: str, body: dict[str, Any], calls: list[dict[str, Any]]
                     ) -> tuple[tuple[SettingChange, ...], bool]:
    """The session-level setting changes of one statement, and whether any is opaque."""
    changes: list[SettingChange] = []
    opaque = False
    if tag == "VariableSetStmt" and (body.get("name") or "").lower() in _TRANSACTION_SCOPED:
        return (), False  # only ever the current transaction's (outside one: a warning, no effect)
    if tag == "VariableSetStmt" and not body.get("is_local"):
        kind, name = body.get("kind"), body.get("name")
        name = name.lower() if name is not None else None  # setting names ignore case, quoted or not
        if kind == "VAR_RESET_ALL":
            changes.append(SettingChange(None, None))
        elif kind in ("VAR_RESET", "VAR_SET_DEFAULT"):
            changes.append(SettingChange(name, None))
        elif kind == "VAR_SET_VALUE":
            value = _set_value(name, body.get("args", ()))
            if value is None:
                opaque = True
            else:
                changes.append(SettingChange(name, value))
        elif kind == "VAR_SET_CURRENT" or (kind == "VAR_SET_MULTI" and name != "TRANSACTION"):
            opaque = True  # SET x FROM CURRENT, SET SESSION CHARACTERISTICS AS TRANSACTION ...
    elif tag == "DiscardStmt" and body.get("target") == "DISCARD_ALL":
        changes.append(SettingChange(None, None))
    for call in calls:
        change = _set_config_change(call.get("args", ()))
        if change is None:
            opaque = True
        elif change.name is not None and change.name not in _TRANSACTION_SCOPED:
            changes.append(change)
    return tuple(changes), opaque


def _set_value(name: str | None, args: Any) -> str | None:
    """SET name TO a, b: the value as set_config() takes it, or None if it is not constants."""
    parts = []
    for arg in args:
        text = const_text(arg)
        if text is None:
            return None
        if name in LIST_QUOTE and "sval" in arg["A_Const"]:
            text = _quote_ident(text)
        parts.append(text)
    return ", ".join(parts) if parts else None


def _quote_ident(name: str) -> str:
    """Quote an identifier unless it is plain lower case, as PostgreSQL's quote_ident does."""
    plain = bool(name) and (name[0] == "_" or "a" <= name[0] <= "z") and all(
        ch == "_" or "a" <= ch <= "z" or "0" <= ch <= "9" for ch in name)
    return name if plain else '"' + name.replace('"', '""') + '"'


def _set_config_change(args: Any) -> SettingChange | None:
    """set_config('name', 'value', false) with constants: the change; None if not constants.

    A transaction-local call (is_local true) changes nothing that outlives the transaction,
    so it comes back as a change with no name, which callers skip.
    """
    if len(args) != 3:
        return None
    name, value, is_local = (const_text(arg) for arg in args)
    if name is None or value is None or is_local is None:
        return None
    if is_local in ("on", "true", "t", "1"):
        return SettingChange(None, "local")
    return SettingChange(name.lower(), value)


def _modifying_cte(body: dict[str, Any]) -> bool:
    """WITH d AS (DELETE ... RETURNING *) SELECT ...: a SELECT that writes."""
    for cte in body.get("withClause", {}).get("ctes", ()):
        query = cte.get("CommonTableExpr", {}).get("ctequery", {})
        if next(iter(query), "") in _WRITE or (next(iter(query), "") == "SelectStmt"
                                                and _modifying_cte(query["SelectStmt"])):
            return True
    return False


def _explain_analyzes_write(body: dict[str, Any]) -> bool:
    analyze_on = any(opt.get("DefElem", {}).get("defname") == "analyze" for opt in body.get("options", ()))
    inner = body.get("query", {})
    return analyze_on and next(iter(inner), "SelectStmt") in _WRITE


def _option_sets_read_write(option: dict[str, Any]) -> bool:
    elem = option.get("DefElem", {})
    if elem.get("defname") != "transaction_read_only":
        return False
    const = elem.get("arg", {}).get("A_Const", {})
    value: int = const.get("ival", {}).get("ival", 0)
    return value == 0


def _scan(node: Any) -> tuple[frozenset[Relation], list[dict[str, Any]], list[dict[str, Any]], list[str],
                             set[str]]:
    """One walk of a statement's tree: the relations it names (but its own CTEs), its
    set_config() calls, its query levels (SELECT/UPDATE/DELETE bodies, for keybind), and
    the session state it creates (temporary relations, session advisory locks), and the
    names of the functions it calls (schema-qualified but for pg_catalog's).

    Decides by the key a child sits under, so each node costs one dict iteration; this is
    most of a plan-cache miss.
    """
    found: list[Relation] = []
    ctes: set[str] = set()
    calls: list[dict[str, Any]] = []
    levels: list[dict[str, Any]] = []
    state: list[str] = []
    functions: set[str] = set()
    stack: list[Any] = [node]
    while stack:
        item = stack.pop()
        if type(item) is list:
            stack.extend(item)
            continue
        for key, value in item.items():
            kind = type(value)
            if kind is dict:
                if "relpersistence" in value:  # a RangeVar's body, under any key
                    found.append(Relation(value["relname"], value.get("schemaname")))
                    if value["relpersistence"] == "t":  # CREATE TEMP ..., SELECT INTO TEMP
                        state.append("temporary table")
                    continue  # its alias holds no relation
                if key in _SCAN_KEYS:
                    if key == "CommonTableExpr":
                        ctes.add(value.get("ctename", ""))
                    elif key == "FuncCall" or key == "funccall":  # funccall: CALL's procedure
                        name = keybind.names(value.get("funcname", ()))
                        functions.add(".".join(filter(None, name[1:] if name[:1] == ["pg_catalog"] else name)))
                        if name and name[:-1] in ([], ["pg_catalog"]):
                            if name[-1] == "set_config":
                                calls.append(value)
                            elif name[-1] in _SESSION_LOCKS:
                                state.append("an advisory lock")
                            elif name[-1] == "pg_advisory_unlock_all":
                                state.append("pg_advisory_unlock_all")
                    else:
                        levels.append(value)
                stack.append(value)
            elif kind is list:
                stack.append(value)
    relations = frozenset(r for r in found if r.schema is not None or r.name not in ctes)
    return relations, calls, levels, state, functions


# "larg" and "rarg" hold the arms of UNION / INTERSECT / EXCEPT: SELECT bodies, unwrapped.
_SCAN_KEYS = frozenset({"CommonTableExpr", "FuncCall", "funccall", "larg", "rarg", *keybind.LEVELS})


def _dropped(body: dict[str, Any]) -> list[Relation]:
    names = []
    for obj in body.get("objects", ()):
        parts = [item["String"]["sval"] for item in obj.get("List", {}).get("items", ()) if "String" in item]
        if parts:
            names.append(Relation(parts[-1], parts[-2] if len(parts) > 1 else None))
    return names


def is_catalog(relation: Relation) -> bool:
    """Catalog relations exist in every database, so they never decide a route."""
    if relation.schema is not None:
        return relation.schema in _CATALOG_SCHEMAS
    return relation.name.startswith("pg_")


def split_insert(sql: str, row_places: tuple[str, ...]) -> dict[str, str]:
    """An INSERT ... VALUES as one INSERT per place, each with its rows (in order).

    ``row_places`` names the place of each VALUES row. ON CONFLICT and RETURNING are kept.
    """
    return {place: text for place, (text, _) in split_insert_params(sql, row_places).items()}


def _values_of(raw: Any) -> pg.SelectStmt:
    """The VALUES list an INSERT writes: INSERT ... VALUES, or INSERT ... SELECT ... FROM
    (VALUES ...) AS x(...) (keybind.insert_keys found the key there)."""
    select = raw.stmt.selectStmt if isinstance(raw.stmt, pg.InsertStmt) else None
    assert isinstance(select, pg.SelectStmt), "the router splits only INSERTs of VALUES rows"
    if select.valuesLists:
        return select
    source = (select.fromClause or (None,))[0]
    assert isinstance(source, pg.RangeSubselect) and isinstance(source.subquery, pg.SelectStmt)
    return source.subquery


class _Params(Visitor):
    """The ParamRef nodes of a tree."""

    def __init__(self) -> None:
        self.found: list[pg.ParamRef] = []

    def visit_ParamRef(self, ancestors: Any, node: pg.ParamRef) -> None:
        self.found.append(node)


def _param_refs(node: Any) -> list[pg.ParamRef]:
    finder = _Params()
    finder(node)
    return finder.found


def split_insert_params(sql: str, row_places: tuple[str, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """An INSERT ... VALUES with parameters as one INSERT per place, each with its rows and its
    parameters renumbered from $1: ``{place: (text, the client's parameter numbers, in the
    order of the new ones)}``. Parameters outside the VALUES rows (ON CONFLICT, RETURNING) go
    to every place. The client's own text is cut at its rows (PostgreSQL's scanner finds them);
    where that does not find exactly the rows the router counted, pglast's AST and deparser."""
    found = _split_by_tokens(sql, row_places)
    return found if found is not None else _split_by_tree(sql, row_places)


def _split_by_tokens(sql: str, row_places: tuple[str, ...]) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    layout = _insert_layout(sql)
    if layout is None or len(layout.rows) != len(row_places):
        return None
    rows, head, tail = layout.rows, layout.head, layout.tail
    shared = {n for _, _, n in head[1]} | {n for _, _, n in tail[1]}
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for place in dict.fromkeys(row_places):
        mine = [row for row, p in zip(rows, row_places, strict=True) if p == place]
        numbers = tuple(sorted(shared.union(*({n for _, _, n in row[1]} for row in mine))))
        renumber = {old: new for new, old in enumerate(numbers, 1)}

        def text(piece: tuple[tuple[int, int], list[tuple[int, int, int]]], renumber: dict[int, int]) -> str:
            (begin, end), params = piece
            parts, at = [], begin
            for a, b, n in params:
                parts.append(sql[at:a])
                parts.append(f"${renumber[n]}")
                at = b
            parts.append(sql[at:end])
            return "".join(parts)

        body = ", ".join(text(row, renumber) for row in mine)
        out[place] = (text(head, renumber) + body + text(tail, renumber), numbers)
    return out


class _Layout(msgspec.Struct, frozen=True):
    """An INSERT's text cut at its VALUES rows: each piece is its (start, end) in the text and
    its parameters there, as (start, end, number)."""

    head: tuple[tuple[int, int], list[tuple[int, int, int]]]  # up to the first row
    rows: list[tuple[tuple[int, int], list[tuple[int, int, int]]]]  # each row, "(" to ")"
    tail: tuple[tuple[int, int], list[tuple[int, int, int]]]  # after the last row


@functools.lru_cache(maxsize=64)
def _insert_layout(sql: str) -> _Layout | None:
    """Where an INSERT's VALUES rows and its parameters are in its text, by PostgreSQL's
    scanner. Kept per text: a driver binds one text many times (SQLAlchemy's
    insertmanyvalues sends each batch with the same text)."""
    tokens = scan_tokens(sql)
    spans: list[tuple[int, int]] = []
    for at, token in enumerate(tokens):
        if token.name == "VALUES" and at + 1 < len(tokens) and tokens[at + 1].name == "ASCII_40":
            depth, start = 0, -1
            for item in tokens[at + 1:]:
                if item.name == "ASCII_40":
                    if depth == 0:
                        start = item.start
                    depth += 1
                elif item.name == "ASCII_41":
                    depth -= 1
                    if depth == 0:
                        spans.append((start, item.end + 1))
                    elif depth < 0:
                        break
                elif depth == 0 and item.name not in ("ASCII_44", "C_COMMENT", "SQL_COMMENT"):
                    break
            break
    if not spans:
        return None
    params = [(token.start, token.end + 1, int(sql[token.start + 1:token.end + 1]))
              for token in tokens if token.name == "PARAM"]
    starts = [a for a, _, _ in params]

    def piece(begin: int, end: int) -> tuple[tuple[int, int], list[tuple[int, int, int]]]:
        return (begin, end), params[bisect.bisect_left(starts, begin):bisect.bisect_left(starts, end)]

    return _Layout(piece(0, spans[0][0]), [piece(a, b) for a, b in spans], piece(spans[-1][1], len(sql)))


def _split_by_tree(sql: str, row_places: tuple[str, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for place in dict.fromkeys(row_places):
        (raw,) = parse_sql(sql)
        values = _values_of(raw)
        rows = values.valuesLists or ()
        values.valuesLists = ()
        shared = _param_refs(raw)  # outside the rows
        mine = tuple(row for row, p in zip(rows, row_places, strict=True) if p == place)
        values.valuesLists = mine
        refs = shared + [ref for row in mine for ref in _param_refs(row)]
        numbers = tuple(sorted({int(ref.number or 0) for ref in refs}))
        renumber = {old: new for new, old in enumerate(numbers, 1)}
        for ref in refs:
            ref.number = renumber[int(ref.number or 0)]
        out[place] = (RawStream()(raw), numbers)
    return out


def fanout_plan(sql: str, key_columns: Mapping[str, str], shape: str) -> FanoutPlan:
    """The federated plan of a SELECT that runs on every shard (see ``fanout.py``).

    Raises ``Unmergeable`` for shapes that cannot be merged exactly. Runs once per text (the
    route cache keeps the plan), so it can afford pglast's AST and deparser.
    """
    statements = parse_sql(sql)
    if len(statements) != 1 or type(statements[0].stmt).__name__ != "SelectStmt":
        raise Unmergeable("several statements in one fan-out query", "send each SELECT on its own")
    return plan_fanout(statements[0].stmt, _deparse, key_columns, shape)


def _deparse(node: Any) -> str:
    return str(RawStream()(node))


_AGGREGATES = {"count", "sum", "min", "max", "avg", "bool_and", "bool_or", "every", "array_agg",
               "string_agg", "json_agg", "jsonb_agg", "stddev", "variance", "percentile_cont",
               "percentile_disc", "mode"}


def _shape(body: dict[str, Any]) -> str:
    """A SELECT in a few words: its aggregates, GROUP BY, ORDER BY, LIMIT, DISTINCT, windows."""
    parts = []
    calls = []
    stack: list[Any] = list(body.get("targetList", ()))
    windows = False
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            call = node.get("FuncCall")
            if isinstance(call, dict):
                name = call.get("funcname", [{}])[-1].get("String", {}).get("sval", "")
                if "over" in call:
                    windows = True
                elif name in _AGGREGATES:
                    calls.append(f"{name}({'DISTINCT ' if call.get('agg_distinct') else ''}"
                                 f"{'*' if call.get('agg_star') else '...'})")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    if calls:
        parts.append(", ".join(sorted(set(calls))))
    if windows:
        parts.append("window functions")
    for key, words in (("groupClause", "GROUP BY"), ("havingClause", "HAVING"), ("distinctClause", "DISTINCT"),
                       ("sortClause", "ORDER BY"), ("limitCount", "LIMIT"), ("limitOffset", "OFFSET")):
        if key in body:
            parts.append(words)
    if not parts:
        return "a plain SELECT"
    head, rest = (parts[0], parts[1:]) if calls else ("", parts)
    return "SELECT" + (f" {head}" if head else "") + (f" with {', '.join(rest)}" if rest else "")


# ---------------------------------------------------------------------------------------------
# COPY statements (``copyrows`` decides what pgfleet does with them)


def copy_from_stdin(sql: str) -> tuple[str, tuple[str, ...], dict[str, str | bool]] | None:
    """A COPY of one table FROM STDIN: its table, its column list (empty: all, in table order)
    and its options by name; None when ``sql`` is anything else or does not parse."""
    try:
        tree = _decode(parse_sql_json(sql))
    except ParseError:
        return None
    stmts = tree.get("stmts", ())
    if len(stmts) != 1 or "CopyStmt" not in stmts[0].get("stmt", {}):
        return None
    body: dict[str, Any] = stmts[0]["stmt"]["CopyStmt"]
    if not body.get("is_from") or "relation" not in body or "filename" in body or body.get("is_program"):
        return None
    options: dict[str, str | bool] = {}
    for item in body.get("options", ()):
        elem = item["DefElem"]
        arg = elem.get("arg", {})
        value: str | bool = arg["String"]["sval"] if "String" in arg else arg.get("Boolean", {}).get("boolval", True)
        options[elem["defname"]] = value
    columns = tuple(c["String"]["sval"] for c in body.get("attlist", ()))
    return body["relation"]["relname"], columns, options


def copy_to_stdout(sql: str) -> tuple[str, dict[str, str | bool]] | None:
    """A COPY of a table or query TO STDOUT: the SELECT it stands for and its options by name;
    None when ``sql`` is anything else or does not parse. Rare, so it uses pglast's AST and
    deparser."""
    try:
        statements = parse_sql(sql)
    except ParseError:
        return None
    stmt = statements[0].stmt if len(statements) == 1 else None
    if not isinstance(stmt, pg.CopyStmt) or stmt.is_from or stmt.filename is not None or stmt.is_program:
        return None
    options: dict[str, str | bool] = {}
    for elem in stmt.options or ():
        arg = elem.arg
        if arg is None:
            options[elem.defname] = True
        else:
            options[elem.defname] = arg.sval if hasattr(arg, "sval") else getattr(arg, "boolval", True)
    if stmt.query is not None:
        select = _deparse(stmt.query)
    else:
        relation = _deparse(stmt.relation)
        columns = ", ".join('"' + c.sval.replace('"', '""') + '"' for c in stmt.attlist) if stmt.attlist else "*"
        select = f"SELECT {columns} FROM {relation}"
    return select, options


# ---------------------------------------------------------------------------------------------
# Statement text for the audit log (called in its writer's thread)

UNPARSABLE = "<unparsable>"
_CACHED_TEXT = 4096    # statements up to this many characters keep their normalised form (LRU)
_LITERALS = frozenset({"SCONST", "USCONST", "BCONST", "XCONST", "ICONST", "FCONST"})
_COMMENTS = frozenset({"C_COMMENT", "SQL_COMMENT"})


def normalized(sql: str) -> tuple[str, str | None]:
    """``sql`` without its literals and comments, and its fingerprint.

    ``normalize`` (libpg_query, pg_stat_statements' rules) leaves some constants alone:
    utility statements (``PREPARE``, ``EXECUTE``, ``COMMENT ... IS``, ``COPY ... FROM 'file'``),
    DDL defaults, and comments, which may quote anything. A pass over its tokens replaces what
    is left with further ``$n`` and drops comments, so no literal gets out. Text that does not
    parse is ``UNPARSABLE``.
    """
    if len(sql) <= _CACHED_TEXT:
        return _normalized_cached(sql)
    return _normalized(sql)


def _normalized(sql: str) -> tuple[str, str | None]:
    try:
        return _scrub(normalize(sql)), fingerprint(sql)
    except ParseError:
        return UNPARSABLE, None


_normalized_cached = functools.lru_cache(maxsize=2048)(_normalized)


def _scrub(text: str) -> str:
    tokens = scan_tokens(text)
    if not any(t.name in _LITERALS or t.name in _COMMENTS for t in tokens):
        return text
    params = [int(text[t.start + 1:t.end + 1]) for t in tokens if t.name == "PARAM"]
    n = max(params, default=0)
    parts: list[str] = []
    done = 0
    for token in tokens:
        if token.name in _LITERALS:
            n += 1
            parts.append(f"{text[done:token.start]}${n}")
            done = token.end + 1
        elif token.name in _COMMENTS:  # a comment and the blanks around it become one blank
            parts.append(f"{text[done:token.start].rstrip()} ")
            done = token.end + 1
            while done < len(text) and text[done].isspace():
                done += 1
    parts.append(text[done:])
    return "".join(parts).strip()


def fingerprinted(sql: str) -> str | None:
    """The fingerprint of ``sql`` as sent (``statements: full``); None when it does not parse."""
    if len(sql) <= _CACHED_TEXT:
        return _fingerprint_cached(sql)
    return _fingerprint(sql)


def _fingerprint(sql: str) -> str | None:
    try:
        return fingerprint(sql)
    except ParseError:
        return None


_fingerprint_cached = functools.lru_cache(maxsize=2048)(_fingerprint)
