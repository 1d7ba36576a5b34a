"""Where a statement binds the shard key of each sharded table it reads. Pure.

Works on the parse tree as ``parse.py`` gets it from libpg_query (JSON dicts), so it needs
no pglast import. For every occurrence of a sharded table (in FROM, JOIN, UPDATE, DELETE,
USING, and in CTEs and subqueries, each at its own query level) it finds the conjuncts of
that level's WHERE and JOIN ... ON that pin the table's shard-key column:

- ``key = const``, ``const = key`` (a cast on the constant is allowed),
- ``key = $n`` (the value comes from Bind),
- ``key IN (const, $n, ...)``,
- ``key = ANY($n)`` (an array parameter).

A conjunct under OR or NOT binds nothing. Any one binding conjunct is enough: every row
the statement can touch satisfies it, so the shards of its values hold them all.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import msgspec


class KeyValue(msgspec.Struct, frozen=True):
    """One value a shard key is bound to: a constant (as text) or a parameter number."""

    text: str | None = None
    param: int | None = None  # $n, 1-based
    array: bool = False       # = ANY($n): the parameter is an array of values


class Occurrence(msgspec.Struct, frozen=True):
    """One place a sharded table is read or written, and the values that pin its key."""

    table: str
    values: tuple[KeyValue, ...] | None  # None: not bound, every shard may hold its rows


class Placement(msgspec.Struct, frozen=True):
    """How the sharded tables of one statement sit together."""

    occurrences: tuple[Occurrence, ...]
    colocated: bool  # one query level, all joined to each other on their shard keys


def occurrences(stmt: dict[str, Any], sharded: Mapping[str, str]) -> list[Occurrence]:
    """Every occurrence of a sharded table in one statement (``{"SelectStmt": {...}}``)."""
    return list(placement(stmt, sharded).occurrences)


def placement(stmt: dict[str, Any], sharded: Mapping[str, str],
              query_levels: list[dict[str, Any]] | None = None) -> Placement:
    """``query_levels``: the statement's levels when the caller walked the tree already."""
    found: list[Occurrence] = []
    levels = 0
    colocated = True
    for level in query_levels if query_levels is not None else _levels(stmt):
        tables = list(_tables_of(level, sharded))
        if not tables:
            continue
        levels += 1
        conjuncts = list(_conjuncts(level.get("whereClause")))
        for join in _joins(level):
            conjuncts.extend(_conjuncts(join.get("quals")))
        single = len(tables) == 1
        for table, alias in tables:
            column = sharded[table]
            values = None
            for conjunct in conjuncts:
                values = _binding(conjunct, column, alias, table, single)
                if values is not None:
                    break
            found.append(Occurrence(table, values))
        # Co-location holds through outer joins too: their ON still pairs equal keys.
        pairs = list(conjuncts)
        for join in _joins(level, outer=True):
            pairs.extend(_conjuncts(join.get("quals")))
        if len(tables) > 1 and not _joined_on_keys(tables, pairs, sharded):
            colocated = False
    return Placement(tuple(found), colocated and levels <= 1)


def _joined_on_keys(tables: list[tuple[str, str | None]], conjuncts: list[dict[str, Any]],
                    sharded: Mapping[str, str]) -> bool:
    """Whether ``a.key = b.key`` conjuncts connect every sharded table of a level."""
    names = [alias or table for table, alias in tables]
    group = {name: name for name in names}

    def root(name: str) -> str:
        while group[name] != name:
            name = group[name]
        return name

    by_name = {alias or table: table for table, alias in tables}
    for conjunct in conjuncts:
        a_expr = _equality(conjunct)
        if a_expr is None or a_expr.get("kind") != "AEXPR_OP":
            continue
        sides = []
        for node in (a_expr.get("lexpr"), a_expr.get("rexpr")):
            fields = _column(node)
            if len(fields) >= 2 and fields[-2] in by_name and fields[-1] == sharded[by_name[fields[-2]]]:
                sides.append(fields[-2])
        if len(sides) == 2:
            group[root(sides[0])] = root(sides[1])
    return len({root(name) for name in names}) == 1


class InsertKeys(msgspec.Struct, frozen=True):
    """The shard-key value of each row an INSERT ... VALUES writes into a sharded table."""

    table: str
    rows: tuple[KeyValue | None, ...] | None  # None: not VALUES (INSERT ... SELECT, DEFAULT VALUES)
    values_lists: int = 0
    # INSERT without a column list: each row's values by position (the key's position is the
    # catalog's, known to the router); ``rows`` are then all None.
    positional: tuple[tuple[KeyValue | None, ...], ...] | None = None


def insert_keys(body: dict[str, Any], sharded: Mapping[str, str]) -> InsertKeys | None:
    """For ``InsertStmt`` bodies into a sharded table; None for any other table."""
    table = body.get("relation", {}).get("relname")
    if table not in sharded:
        return None
    columns = [target.get("ResTarget", {}).get("name") for target in body.get("cols", ())]
    select = body.get("selectStmt", {}).get("SelectStmt")
    lists = select.get("valuesLists") if isinstance(select, dict) else None
    if not lists and isinstance(select, dict) and sharded[table] in columns:
        # INSERT ... SELECT a, b FROM (VALUES ...) AS x(a, b) [ORDER BY ...] (SQLAlchemy's
        # insertmanyvalues): the key is the VALUES column its select-list entry names.
        found = _values_source(select, columns.index(sharded[table]))
        if found is not None:
            lists, index = found
            rows = [_value(row.get("List", {}).get("items", ())[index])
                    if index < len(row.get("List", {}).get("items", ())) else None for row in lists]
            return InsertKeys(table, tuple(rows), len(lists))
    if not lists or any(key in select for key in ("withClause", "sortClause", "limitCount")):
        return InsertKeys(table, None)
    if not columns:
        positional = tuple(tuple(_value(item) for item in row.get("List", {}).get("items", ())) for row in lists)
        return InsertKeys(table, tuple(None for _ in lists), len(lists), positional)
    if sharded[table] not in columns:
        return InsertKeys(table, tuple(None for _ in lists), len(lists))
    index = columns.index(sharded[table])
    rows = []
    for row in lists:
        items = row.get("List", {}).get("items", ())
        rows.append(_value(items[index]) if index < len(items) else None)
    return InsertKeys(table, tuple(rows), len(lists))


_NOT_PLAIN = ("whereClause", "groupClause", "havingClause", "limitCount", "limitOffset", "distinctClause",
              "withClause", "windowClause", "valuesLists", "larg", "intoClause", "lockingClause")


def _values_source(select: dict[str, Any], key_index: int) -> tuple[list[Any], int] | None:
    """A SELECT of columns (maybe cast) of one VALUES list in FROM, each row once: the VALUES
    rows and the place of the column the select list's ``key_index``-th entry names; None for
    any other SELECT (a WHERE, a join, an expression of the key: which rows it writes is then
    not the VALUES rows)."""
    sources = select.get("fromClause", ())
    targets = select.get("targetList", ())
    if len(sources) != 1 or any(key in select for key in _NOT_PLAIN) or key_index >= len(targets):
        return None
    subselect = sources[0].get("RangeSubselect")
    if subselect is None:
        return None
    inner = subselect.get("subquery", {}).get("SelectStmt", {})
    lists = inner.get("valuesLists")
    names = [item.get("String", {}).get("sval") for item in subselect.get("alias", {}).get("colnames", ())]
    if not lists or not names:
        return None
    node = targets[key_index].get("ResTarget", {}).get("val", {})
    while "TypeCast" in node:
        node = node["TypeCast"].get("arg", {})
    fields = _column(node)
    if not fields or fields[-1] not in names:
        return None
    return lists, names.index(fields[-1])


def updates_key(body: dict[str, Any], sharded: Mapping[str, str]) -> bool:
    """Whether an ``UpdateStmt`` body assigns the shard key of its (sharded) table."""
    table = body.get("relation", {}).get("relname")
    if table not in sharded:
        return False
    return any(target.get("ResTarget", {}).get("name") == sharded[table]
               for target in body.get("targetList", ()))


LEVELS = ("SelectStmt", "UpdateStmt", "DeleteStmt")


def _levels(node: Any) -> Iterator[dict[str, Any]]:
    """Every query level (SELECT, UPDATE, DELETE, and those inside CTEs and subqueries)."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for tag in LEVELS:
                if tag in item:
                    yield item[tag]
            for arm in ("larg", "rarg"):  # a set operation's arms: SELECT bodies, unwrapped
                if arm in item:
                    yield item[arm]
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _tables_of(level: dict[str, Any], sharded: Mapping[str, str]) -> Iterator[tuple[str, str | None]]:
    """(table, alias) of the sharded tables this level reads directly."""
    roots: list[Any] = list(level.get("fromClause", ())) + list(level.get("usingClause", ()))
    relation = level.get("relation")
    if isinstance(relation, dict) and "relname" in relation:
        roots.append({"RangeVar": relation})
    stack = roots
    while stack:
        item = stack.pop()
        if not isinstance(item, dict):
            continue
        if "RangeVar" in item:
            var = item["RangeVar"]
            if var.get("relname") in sharded:
                yield var["relname"], var.get("alias", {}).get("aliasname")
        elif "JoinExpr" in item:
            stack.extend((item["JoinExpr"].get("larg"), item["JoinExpr"].get("rarg")))


def _joins(level: dict[str, Any], outer: bool = False) -> Iterator[dict[str, Any]]:
    stack = list(level.get("fromClause", ()))
    while stack:
        item = stack.pop()
        if isinstance(item, dict) and "JoinExpr" in item:
            join = item["JoinExpr"]
            if outer or join.get("jointype", "JOIN_INNER") == "JOIN_INNER":  # an outer ON filters nothing
                yield join
            stack.extend((join.get("larg"), join.get("rarg")))


def _conjuncts(expr: Any) -> Iterator[dict[str, Any]]:
    if not isinstance(expr, dict):
        return
    boolexpr = expr.get("BoolExpr")
    if boolexpr is not None:
        if boolexpr.get("boolop") == "AND_EXPR":
            for arg in boolexpr.get("args", ()):
                yield from _conjuncts(arg)
        return  # OR / NOT bind nothing
    yield expr


def _binding(expr: dict[str, Any], column: str, alias: str | None, table: str,
             single: bool) -> tuple[KeyValue, ...] | None:
    a_expr = _equality(expr)
    if a_expr is None:
        return None
    kind, left, right = a_expr.get("kind"), a_expr.get("lexpr"), a_expr.get("rexpr")
    if kind == "AEXPR_OP":
        if not _is_key(left, column, alias, table, single):
            left, right = right, left
        if _is_key(left, column, alias, table, single):
            value = _value(right)
            return (value,) if value is not None else None
    elif kind == "AEXPR_IN" and _is_key(left, column, alias, table, single):
        items = right.get("List", {}).get("items", ()) if isinstance(right, dict) else ()
        values = [_value(item) for item in items]
        if values and all(v is not None for v in values):
            return tuple(v for v in values if v is not None)
    elif kind == "AEXPR_OP_ANY" and _is_key(left, column, alias, table, single):
        value = _value(right)
        if value is not None and value.param is not None:
            return (KeyValue(param=value.param, array=True),)
    return None


def names(items: Any) -> list[str | None]:
    """The strings of a list of String nodes (a function's or operator's qualified name)."""
    return [item.get("String", {}).get("sval") for item in items]


def _equality(expr: dict[str, Any]) -> dict[str, Any] | None:
    """The A_Expr of an ``=`` (plain, IN or ANY), or None."""
    a_expr = expr.get("A_Expr")
    return a_expr if a_expr is not None and names(a_expr.get("name", ())) == ["="] else None


def _column(node: Any) -> list[str | None]:
    """A ColumnRef's name parts ([] for anything else)."""
    if not isinstance(node, dict) or "ColumnRef" not in node:
        return []
    return names(node["ColumnRef"].get("fields", ()))


def _is_key(node: Any, column: str, alias: str | None, table: str, single: bool) -> bool:
    fields = _column(node)
    if not fields or fields[-1] != column:
        return False
    if len(fields) == 1:
        return single  # unqualified: only when one sharded table is in reach
    qualifier = fields[-2]
    return qualifier == (alias or table)


def _value(node: Any) -> KeyValue | None:
    if not isinstance(node, dict):
        return None
    if "TypeCast" in node:
        return _value(node["TypeCast"].get("arg"))
    if "ParamRef" in node:
        return KeyValue(param=node["ParamRef"].get("number", 0))
    fval = node.get("A_Const", {}).get("fval")
    if fval is not None and not fval.get("fval", "").lstrip("-").isdigit():
        return None  # key = 1.0 compares as numeric: it binds no integer shard key to one value
    text = const_text(node)
    return KeyValue(text=text) if text is not None else None


def const_text(node: Any) -> str | None:
    """An A_Const node as text (booleans as on/off), or None for anything else or NULL."""
    const = node.get("A_Const") if isinstance(node, dict) else None
    if const is None or const.get("isnull"):
        return None
    if "sval" in const:
        return str(const["sval"].get("sval", ""))
    if "ival" in const:
        return str(const["ival"].get("ival", 0))
    if "fval" in const:
        return str(const["fval"].get("fval", "0"))
    if "boolval" in const:
        return "on" if const["boolval"].get("boolval") else "off"
    return None
