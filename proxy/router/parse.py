"""The only module that imports pglast: statement text -> ``Analysis``.

Uses ``parse_sql_json`` (libpg_query's JSON output) rather than building pglast's Python
AST, because that is 5-20x faster (DESIGN "Performance stance"). It classifies each
statement and collects the relations it names, leaving out CTE names. It never decides a
route; that is ``router.router``'s job.
"""

from __future__ import annotations

import json
from typing import Any

from pglast.parser import ParseError, parse_sql_json

from .route import Analysis, Kind, Relation, Statement

_READ = {"SelectStmt": "SELECT", "ExplainStmt": "EXPLAIN", "VariableShowStmt": "SHOW",
         "FetchStmt": "FETCH", "ClosePortalStmt": "CLOSE CURSOR", "DeclareCursorStmt": "DECLARE CURSOR"}
_WRITE = {"InsertStmt": "INSERT", "UpdateStmt": "UPDATE", "DeleteStmt": "DELETE",
          "MergeStmt": "MERGE", "CallStmt": "CALL", "DoStmt": "DO"}
_SESSION = {"VariableSetStmt": "SET", "DiscardStmt": "DISCARD", "ListenStmt": "LISTEN",
            "UnlistenStmt": "UNLISTEN", "NotifyStmt": "NOTIFY", "PrepareStmt": "PREPARE",
            "ExecuteStmt": "EXECUTE", "DeallocateStmt": "DEALLOCATE", "LoadStmt": "LOAD"}
_READ_ONLY_GUCS = {"default_transaction_read_only", "transaction_read_only"}
_CATALOG_SCHEMAS = {"pg_catalog", "information_schema"}


def analyze(sql: str) -> Analysis:
    try:
        tree = json.loads(parse_sql_json(sql))
    except ParseError as exc:
        return Analysis((), syntax_error=str(exc))
    stmts = tuple(_statement(raw["stmt"]) for raw in tree.get("stmts", ()) if "stmt" in raw)
    return Analysis(stmts)


def _statement(node: dict[str, Any]) -> Statement:
    (tag, body), = node.items()
    relations = frozenset(_relations(body))
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
        return Statement(Kind.TRANSACTION, "TRANSACTION", relations, violation)
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
    return const.get("ival", {}).get("ival", 0) == 0


def _relations(body: Any) -> list[Relation]:
    """Every RangeVar under ``body`` except references to the statement's own CTEs."""
    found: list[Relation] = []
    ctes: set[str] = set()
    stack = [body]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "relname" in node and "relpersistence" in node:
                found.append(Relation(node["relname"], node.get("schemaname")))
            elif "ctename" in node:
                ctes.add(node["ctename"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return [r for r in found if r.schema is not None or r.name not in ctes]


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
