"""The plan of a federated SELECT: what each shard runs and how pgfleet merges the answers.

Pure. It reads the statement's pglast AST (given by ``parse.py``, the one module that
imports pglast; nodes are read by their class name here) and writes the shard query as
text. A plan is exact or there is none: ``plan_fanout`` raises ``Unmergeable`` naming the
shape and the way out, and the statement is refused with ``0A000``.

Two kinds of plan:

- **rows** (no aggregate, no GROUP BY): every shard runs the query with its ORDER BY, and
  ``LIMIT limit+offset`` when there is one (OFFSET is applied once, by the merger). Sort
  keys missing from the select list are added at its end as hidden columns. The merger
  streams the rows through, or k-way merges them on the decoded sort keys.
- **groups** (aggregates or GROUP BY): every shard returns its partial aggregates per group
  (``avg`` as ``sum`` and ``count``); the merger combines them per group, evaluates HAVING,
  then sorts, applies DISTINCT, OFFSET and LIMIT itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgspec

# Aggregates whose partial results combine exactly.
COMBINABLE = {"count": "count", "sum": "sum", "min": "min", "max": "max", "avg": "avg",
              "bool_and": "bool_and", "every": "bool_and", "bool_or": "bool_or"}
_NOT_EXACT = {
    "stddev", "stddev_pop", "stddev_samp", "variance", "var_pop", "var_samp", "corr", "covar_pop",
    "covar_samp", "regr_avgx", "regr_avgy", "regr_count", "regr_intercept", "regr_r2", "regr_slope",
    "regr_sxx", "regr_sxy", "regr_syy", "array_agg", "string_agg", "json_agg", "jsonb_agg",
    "json_object_agg", "jsonb_object_agg", "xmlagg", "bit_and", "bit_or", "bit_xor", "percentile_cont",
    "percentile_disc", "mode", "rank", "dense_rank", "percent_rank", "cume_dist", "range_agg",
    "range_intersect_agg", "any_value", "json_arrayagg", "json_objectagg",
}


# Set-returning functions: next to aggregates they multiply the merged groups' rows.
_SET_RETURNING = {"generate_series", "unnest", "generate_subscripts", "regexp_matches", "regexp_split_to_table",
                  "string_to_table", "json_array_elements", "jsonb_array_elements", "json_array_elements_text",
                  "jsonb_array_elements_text", "json_each", "jsonb_each", "json_each_text", "jsonb_each_text",
                  "json_object_keys", "jsonb_object_keys", "jsonb_path_query", "json_populate_recordset",
                  "jsonb_populate_recordset", "json_to_recordset", "jsonb_to_recordset", "pg_get_keywords"}
_BYTE_ORDER_COLLATIONS = {"c", "posix", "ucs_basic", "c.utf8", "c.utf-8", "pg_catalog.c", "pg_catalog.posix",
                          "pg_c_utf8", "pg_catalog.pg_c_utf8"}


class Unmergeable(Exception):
    """The statement's shape cannot be merged exactly: refused, naming it."""

    def __init__(self, shape: str, hint: str) -> None:
        super().__init__(shape)
        self.shape = shape
        self.hint = hint


class SortKey(msgspec.Struct, frozen=True):
    column: int          # in the merged row (rows plan: the shard row; groups plan: the output row)
    descending: bool = False
    nulls_first: bool = False


class Output(msgspec.Struct, frozen=True):
    """One column of a groups plan's output row: a group value or a combined aggregate."""

    source: int              # the shard column it comes from (avg: its sum)
    agg: str | None = None   # count, sum, min, max, avg, bool_and, bool_or
    count: int = -1          # avg: the shard column of its count


class Cmp(msgspec.Struct, frozen=True):
    op: str
    left: Any
    right: Any


class Logic(msgspec.Struct, frozen=True):
    op: str                  # and, or, not
    args: tuple[Any, ...]


class IsNull(msgspec.Struct, frozen=True):
    arg: Any
    negated: bool = False


class Ref(msgspec.Struct, frozen=True):
    column: int              # in the output row


class Const(msgspec.Struct, frozen=True):
    text: str | None         # None: NULL


class FanoutPlan(msgspec.Struct, frozen=True):
    sql: str                         # what every shard runs
    shape: str                       # in words, for errors and logs
    groups: bool                     # False: a rows plan
    hidden: int = 0                  # rows plan: trailing shard columns the client does not see
    outputs: tuple[Output, ...] = ()  # groups plan: the output row (visible, then hidden)
    visible: int = 0                 # groups plan: how many outputs the client sees
    group_by: tuple[int, ...] = ()   # groups plan: the shard columns that make the group key
    order: tuple[SortKey, ...] = ()
    limit: int | None = None
    offset: int = 0
    limit_param: int | None = None   # LIMIT $n: the merger's limit comes from Bind (``bound``)
    offset_param: int | None = None

    def bound(self, values: tuple[int | None, ...]) -> FanoutPlan:
        """The plan with LIMIT / OFFSET parameters read (``values``: the Bind's, as integers)."""
        limit, offset = self.limit, self.offset
        if self.limit_param is not None:
            limit = values[self.limit_param - 1]
        if self.offset_param is not None:
            offset = values[self.offset_param - 1] or 0
        return msgspec.structs.replace(self, limit=limit, offset=offset, limit_param=None, offset_param=None)
    distinct: bool = False           # over the visible columns
    distinct_on: tuple[int, ...] = ()
    having: Any = None               # groups plan: Cmp / Logic / IsNull over output columns


def plan_fanout(select: Any, deparse: Callable[[Any], str], key_columns: Mapping[str, str],
                shape: str) -> FanoutPlan:
    """The plan for ``select`` (a pglast SelectStmt node) on every shard.

    ``key_columns``: the sharded tables it reads, with their shard-key columns (a
    ``count(DISTINCT key)`` is exact: each key value lives on one shard).
    """
    return _Planner(select, deparse, key_columns, shape).plan()


def _kind(node: Any) -> str:
    return type(node).__name__


def _name(func: Any) -> str:
    name: str = func.funcname[-1].sval
    return name.lower()


class _Planner:
    def __init__(self, select: Any, deparse: Callable[[Any], str], key_columns: Mapping[str, str],
                 shape: str) -> None:
        self.select = select
        self.deparse = deparse
        self.key_columns = key_columns
        self.shape = shape
        self.columns: list[str] = []    # the shard query's select list, as text
        self.texts: dict[str, int] = {}  # an expression's text -> its shard column
        self.hidden_names = 0
        self.limit_param: int | None = None
        self.offset_param: int | None = None
        self.sharded_ctes: set[str] = set()  # WITH queries that read a sharded table
        self.star_aliases: set[str] = set()

    # -- refusals

    def refuse(self, what: str, hint: str) -> Unmergeable:
        return Unmergeable(what, hint)

    def _check(self) -> None:
        s = self.select
        if s.op is not None and int(s.op) != 0:
            raise self.refuse("a set operation (UNION, INTERSECT or EXCEPT) across shards",
                              "run each side on its own, or bind the shard key on each side")
        if s.windowClause or _has(s, "over"):
            raise self.refuse("window functions over a sharded table",
                              "bind the shard key, or compute the window in the application")
        if s.limitOption is not None and int(s.limitOption) == 2:
            raise self.refuse("FETCH FIRST ... WITH TIES across shards", "use ORDER BY with LIMIT")
        if s.lockingClause:
            raise self.refuse("SELECT ... FOR UPDATE/SHARE across shards", "bind the shard key")
        if s.intoClause:
            raise self.refuse("SELECT INTO across shards", "use CREATE TABLE ... then INSERT")
        for group in s.groupClause or ():
            if _kind(group) in ("GroupingSet",):
                raise self.refuse("GROUP BY ROLLUP, CUBE or GROUPING SETS across shards",
                                  "group by plain expressions")
        for cte in (s.withClause.ctes if s.withClause else ()):
            if _kind(cte.ctequery) != "SelectStmt":
                raise self.refuse("a data-modifying WITH across shards", "run the write on its own")
            self._row_wise(cte.ctequery, f"the WITH query {cte.ctename}")
            if self._reads_sharded(cte.ctequery):
                self.sharded_ctes.add(cte.ctename)
        for item in s.fromClause or ():
            self._from_item(item)
        sources = [name for item in s.fromClause or () for name in self._sharded_sources(item)]
        if not sources:
            raise self.refuse("a query whose sharded tables are only in WITH queries or subqueries it does "
                              "not read from", "read the sharded table in FROM, or bind the shard key")
        if len(sources) > 1 and any(kind != "table" for kind in sources):
            raise self.refuse("a join of a WITH query or subquery on a sharded table with another sharded "
                              "source across shards", "join the tables themselves on the shard key")
        for clause in (s.targetList, s.sortClause, s.havingClause, s.distinctClause, s.groupClause):
            for collate in _nodes(clause, "CollateClause"):
                name = ".".join(part.sval for part in collate.collname if _kind(part) == "String")
                if name.lower() not in _BYTE_ORDER_COLLATIONS:
                    raise self.refuse(f'COLLATE "{name}" in a merged part of the query across shards',
                                      'pgfleet merges text in byte order: use COLLATE "C", or sort in the '
                                      "application")
        for where in (s.whereClause, s.havingClause, *(t.val for t in s.targetList),
                      *(x.node for x in s.sortClause or ())):
            self._sublinks(where)

    def _sharded_sources(self, item: Any) -> list[str]:
        """The sharded sources a FROM item reads: "table" for a sharded table, "derived" for
        a WITH query or subquery over one."""
        kind = _kind(item)
        if kind == "JoinExpr":
            return self._sharded_sources(item.larg) + self._sharded_sources(item.rarg)
        if kind == "RangeVar":
            if item.schemaname is None and item.relname in self.sharded_ctes:
                return ["derived"]
            return ["table"] if item.relname in self.key_columns else []
        if kind == "RangeSubselect":
            return ["derived"] if self._reads_sharded(item.subquery) else []
        return []

    def _from_item(self, item: Any) -> None:
        kind = _kind(item)
        if kind == "JoinExpr":
            self._from_item(item.larg)
            self._from_item(item.rarg)
            self._sublinks(item.quals)
            join = int(item.jointype)  # 0 inner, 1 left, 2 full, 3 right
            left, right = bool(self._sharded_sources(item.larg)), bool(self._sharded_sources(item.rarg))
            if (join == 1 and not left and right) or (join == 3 and left and not right) or \
                    (join == 2 and not (left and right)):
                raise self.refuse("an outer join that keeps the rows of an unsharded table against a sharded "
                                  "one across shards (every shard would return them)",
                                  "put the sharded table on the kept side, or join in the application")
        elif kind == "RangeSubselect":
            if item.lateral:
                raise self.refuse("a LATERAL subquery across shards", "bind the shard key")
            self._row_wise(item.subquery, "a subquery in FROM")
        elif kind == "RangeTableSample":
            raise self.refuse("TABLESAMPLE across shards", "sample each shard on its own")
        elif kind == "RangeFunction":
            self._sublinks(item.functions)

    def _row_wise(self, select: Any, what: str) -> None:
        """A nested SELECT that each shard may run on its own rows: it keeps or drops rows one
        by one (filters, projections, co-located joins), so the shards' parts add up."""
        if not self._reads_sharded(select):
            return
        s = select
        if (s.op is not None and int(s.op) != 0) or s.groupClause or s.havingClause is not None \
                or s.distinctClause or s.limitCount is not None or s.limitOffset is not None \
                or s.windowClause or s.lockingClause or any(
                    _name(f) in COMBINABLE or _name(f) in _NOT_EXACT or f.over is not None
                    for t in s.targetList or () for f in _calls(t.val)):
            raise self.refuse(f"{what} that aggregates, sorts with a limit, removes duplicates or "
                              "combines sets over a sharded table",
                              "move the aggregate to the outer query, or bind the shard key")
        for cte in (s.withClause.ctes if s.withClause else ()):
            self._row_wise(cte.ctequery, f"the WITH query {cte.ctename}")
        for item in s.fromClause or ():
            self._from_item(item)
        for expr in (s.whereClause, *(t.val for t in s.targetList or ())):
            self._sublinks(expr)

    def _sublinks(self, node: Any) -> None:
        """A subquery in an expression sees only its own shard's rows: refused when it reads a
        sharded table (EXISTS, IN, scalar subqueries)."""
        for sub in _nodes(node, "SubLink"):
            if self._reads_sharded(sub.subselect):
                raise self.refuse("a subquery on a sharded table inside an expression across shards",
                                  "join on the shard key instead, or bind the shard key")

    def _reads_sharded(self, node: Any) -> bool:
        return any(var.relname in self.key_columns or (var.schemaname is None and var.relname in self.sharded_ctes)
                   for var in _nodes(node, "RangeVar", into_subqueries=True))

    # -- the plan

    def plan(self) -> FanoutPlan:
        if not self.select.targetList:
            raise self.refuse("a SELECT with an empty select list across shards", "select at least one column")
        self._check()
        s = self.select
        aggregates = [f for t in s.targetList for f in _calls(t.val)]
        aggregates += [f for f in _calls(s.havingClause)]
        aggregates += [f for sort in s.sortClause or () for f in _calls(sort.node)]
        grouped = bool(s.groupClause) or any(_name(f) in COMBINABLE or _name(f) in _NOT_EXACT
                                             for f in aggregates) or s.havingClause is not None
        limit, offset = self._limit()
        if grouped:
            return self._groups(limit, offset)
        return self._rows(limit, offset)

    def _limit(self) -> tuple[int | None, int]:
        s = self.select
        self.limit_param = _param(s.limitCount)
        self.offset_param = _param(s.limitOffset)
        limit = None if self.limit_param else _int_const(s.limitCount, "LIMIT")
        offset = None if self.offset_param else _int_const(s.limitOffset, "OFFSET")
        return limit, offset or 0

    def _pushed_limit(self, limit: int | None, offset: int) -> str | None:
        """The shard query's LIMIT (limit + offset) and OFFSET clauses.

        Parameters stay parameters, cast to bigint as PostgreSQL types them in LIMIT, and the
        sum is capped at bigint's largest value. A parameter the shard query would no longer
        use is kept in an OFFSET that is always 0: a parameter sent without a type must still
        get one from the statement."""
        big = 9223372036854775807
        limit_param, offset_param = self.limit_param, self.offset_param
        if limit_param is None and limit is None:
            return None if offset_param is None else _unused((offset_param,))
        if limit_param is None and offset_param is None:
            assert limit is not None
            return f"LIMIT {min(limit + offset, big)}"
        first = f"${limit_param}::bigint" if limit_param is not None else str(limit)
        second = f"coalesce(${offset_param}::bigint, 0)" if offset_param is not None else str(offset)
        # LIMIT NULL is no limit, and stays NULL through the sum.
        return f"LIMIT least({first}::numeric + {second}::numeric, {big})::bigint"

    def _target_text(self, target: Any) -> str:
        return self.deparse(target.val)

    def _alias(self, name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    def _hidden(self, text: str) -> int:
        found = self.texts.get(text)
        if found is not None:
            return found
        self.hidden_names += 1
        self.columns.append(f"{text} AS \"?pgfleet_{self.hidden_names}\"")
        self.texts[text] = len(self.columns) - 1
        return len(self.columns) - 1

    # -- rows: streamed through, or merged on sort keys

    def _rows(self, limit: int | None, offset: int) -> FanoutPlan:
        s = self.select
        star = any(_is_star(t.val) for t in s.targetList)
        self.star_aliases = {t.name for t in s.targetList if t.name}
        by_alias: dict[str, int] = {}
        visible = len(s.targetList)
        for index, target in enumerate(s.targetList):
            if not star:
                self.texts.setdefault(self._target_text(target), index)
                if target.name:
                    by_alias.setdefault(target.name, index)
        hidden: list[str] = []
        keys: list[tuple[Any, int | None, int]] = []  # (sort clause, select-list column, hidden number)
        for sort in s.sortClause or ():
            column = self._sort_column(sort.node, by_alias, visible, star)
            number = -1
            if column is None:  # not in the select list: a hidden column at its end
                text = self.deparse(sort.node)
                if s.distinctClause and s.distinctClause[0] is None:  # DISTINCT ON allows it
                    raise self.refuse("SELECT DISTINCT ordered by an expression not in its select list",
                                      "add the expression to the select list")
                if text not in hidden:
                    hidden.append(text)
                number = hidden.index(text)
            keys.append((sort, column, number))
        # Hidden columns are counted from the end: with * the select list's length is unknown.
        order = [_sort_key(sort, column if column is not None else number - len(hidden))
                 for sort, column, number in keys]
        distinct_on: tuple[int, ...] = ()
        distinct = False
        if s.distinctClause:
            if s.distinctClause[0] is None:
                distinct = True
            elif star:
                raise self.refuse("SELECT DISTINCT ON with * across shards", "name the columns")
            else:
                positions = []
                for expr in s.distinctClause:
                    column = self._sort_column(expr, by_alias, visible, star)
                    if column is None:
                        raise self.refuse("DISTINCT ON an expression not in the select list across shards",
                                          "add the expression to the select list")
                    positions.append(column)
                distinct_on = tuple(positions)
        sql = self._rows_sql(hidden, self._pushed_limit(limit, offset))
        # Hidden columns counted from the end become shard-row positions once the merger
        # knows the row's width; keep them negative here.
        return FanoutPlan(sql=sql, shape=self.shape, groups=False, hidden=len(hidden), order=tuple(order),
                          limit=limit, offset=offset, distinct=distinct, distinct_on=distinct_on,
                          limit_param=self.limit_param, offset_param=self.offset_param)

    def _sort_column(self, node: Any, by_alias: dict[str, int], visible: int, star: bool) -> int | None:
        if _kind(node) == "A_Const" and _kind(getattr(node, "val", None)) == "Integer":
            position: int = node.val.ival
            if star:
                raise self.refuse(f"ORDER BY position {position} with SELECT * across shards",
                                  "name the columns, or order by the column's name")
            if not 1 <= position <= visible:
                raise self.refuse(f"ORDER BY position {position}", "use a position in the select list")
            return position - 1
        if _kind(node) == "ColumnRef" and len(node.fields) == 1 and _kind(node.fields[0]) == "String":
            name = node.fields[0].sval
            if star and name in self.star_aliases:
                raise self.refuse(f"ORDER BY the output name {name} with SELECT * across shards",
                                  "name the columns, or order by the expression itself")
            if name in by_alias:
                return by_alias[name]
        if star:
            return None
        return self.texts.get(self.deparse(node))

    def _rows_sql(self, hidden: list[str], limit: str | None) -> str:
        s = self.select
        parts = []
        if s.withClause:
            parts.append("WITH " + self.deparse(s.withClause))
        head = "SELECT"
        if s.distinctClause:
            head += " DISTINCT" if s.distinctClause[0] is None else \
                f" DISTINCT ON ({', '.join(self.deparse(e) for e in s.distinctClause)})"
        targets = [self.deparse(t) for t in s.targetList]
        targets += [f"{text} AS \"?pgfleet_{i + 1}\"" for i, text in enumerate(hidden)]
        parts.append(f"{head} {', '.join(targets)}")
        parts.extend(self._from_where())
        if s.sortClause:
            parts.append("ORDER BY " + ", ".join(self.deparse(sort) for sort in s.sortClause))
        if limit is not None:
            parts.append(limit)
        return " ".join(parts)

    def _from_where(self) -> list[str]:
        s = self.select
        parts = []
        if s.fromClause:
            parts.append("FROM " + ", ".join(self.deparse(f) for f in s.fromClause))
        if s.whereClause is not None:
            parts.append("WHERE " + self.deparse(s.whereClause))
        return parts

    # -- groups: partial aggregates combined per group

    def _groups(self, limit: int | None, offset: int) -> FanoutPlan:
        s = self.select
        if any(_is_star(t.val) for t in s.targetList):
            raise self.refuse("SELECT * with aggregates or GROUP BY across shards", "name the columns")
        outputs: list[Output] = []
        by_alias: dict[str, int] = {}
        by_text: dict[str, int] = {}
        for target in s.targetList:
            text = self._target_text(target)
            name = target.name
            outputs.append(self._output(target.val, name, shown=True))
            by_text.setdefault(text, len(outputs) - 1)
            if name:
                by_alias.setdefault(name, len(outputs) - 1)
        self._no_set_returning(s.targetList)
        visible = len(outputs)
        group_by = []
        for item in s.groupClause or ():
            if _kind(item) == "A_Const" and _kind(getattr(item, "val", None)) == "Integer":
                position = item.val.ival
                if not 1 <= position <= visible or outputs[position - 1].agg is not None:
                    raise self.refuse(f"GROUP BY position {position}", "group by a column of the select list")
                group_by.append(outputs[position - 1].source)
                continue
            text = self.deparse(item)
            if _kind(item) == "ColumnRef" and len(item.fields) == 1 and _kind(item.fields[0]) == "String" \
                    and item.fields[0].sval in by_alias and text not in self.texts:
                # PostgreSQL groups by an input column of that name first, and only pgfleet's
                # catalog-free planner cannot tell whether there is one.
                raise self.refuse(f"GROUP BY {text}, which is both an output name and maybe an input column, "
                                  "across shards", "group by the expression itself, or by its position")
            group_by.append(self.texts[text] if text in self.texts else self._hidden(text))

        def output_of(node: Any, names: bool = True) -> int:
            """The output column of an expression in HAVING or ORDER BY, adding a hidden one.

            ORDER BY sees output names first (``names``); HAVING never sees them."""
            text = self.deparse(node)
            bare = _kind(node) == "ColumnRef" and len(node.fields) == 1 and _kind(node.fields[0]) == "String"
            if bare and names and node.fields[0].sval in by_alias:
                return by_alias[node.fields[0].sval]
            if bare and not names and node.fields[0].sval in by_alias and text not in self.texts:
                raise self.refuse(f"HAVING {text}, the name of an output column, across shards",
                                  "write the expression itself in HAVING")
            if text in by_text:
                return by_text[text]
            outputs.append(self._output(node, None))
            by_text[text] = len(outputs) - 1
            return len(outputs) - 1

        having = self._condition(s.havingClause, lambda node: output_of(node, names=False)) \
            if s.havingClause is not None else None
        order = []
        for sort in s.sortClause or ():
            node = sort.node
            if _kind(node) == "A_Const" and _kind(getattr(node, "val", None)) == "Integer":
                position = node.val.ival
                if not 1 <= position <= visible:
                    raise self.refuse(f"ORDER BY position {position}", "use a position in the select list")
                column = position - 1
            else:
                column = output_of(node)
                if s.distinctClause and s.distinctClause[0] is None and column >= visible:
                    raise self.refuse("SELECT DISTINCT ordered by an expression not in its select list",
                                      "add the expression to the select list")
            order.append(_sort_key(sort, column))
        distinct = False
        distinct_on: tuple[int, ...] = ()
        if s.distinctClause:
            if s.distinctClause[0] is None:
                distinct = True
            else:
                distinct_on = tuple(output_of(expr) for expr in s.distinctClause)
        parts = []
        if s.withClause:
            parts.append("WITH " + self.deparse(s.withClause))
        parts.append("SELECT " + ", ".join(self.columns))
        parts.extend(self._from_where())
        if group_by:
            parts.append("GROUP BY " + ", ".join(str(c + 1) for c in dict.fromkeys(group_by)))
        params = tuple(p for p in (self.limit_param, self.offset_param) if p is not None)
        if params:  # applied after the merge; only named so that they get a type
            parts.append(_unused(params))
        return FanoutPlan(sql=" ".join(parts), shape=self.shape, groups=True, outputs=tuple(outputs),
                          visible=visible, group_by=tuple(dict.fromkeys(group_by)), order=tuple(order),
                          limit=limit, offset=offset, distinct=distinct, distinct_on=distinct_on,
                          having=having, limit_param=self.limit_param, offset_param=self.offset_param)

    def _output(self, node: Any, name: str | None, shown: bool = False) -> Output:
        """A select-list (or HAVING / ORDER BY) expression as an output column. A ``shown``
        one gets its own shard column, so that it keeps its own name."""
        if _kind(node) == "FuncCall" and _name(node) in COMBINABLE and node.over is None:
            return self._aggregate(node, name, shown)
        inner = list(_calls(node))
        if inner:
            names = sorted({_name(f) for f in inner})
            if any(n in _NOT_EXACT for n in names):
                raise self.refuse(f"{', '.join(names)} across shards",
                                  "bind the shard key, or aggregate in the application")
            if any(n in COMBINABLE for n in names):
                raise self.refuse(f"an expression over aggregates ({self.deparse(node)}) across shards",
                                  "select the aggregates themselves and compute the expression in the application")
        text = self.deparse(node)
        if text in self.texts and not shown:
            return Output(self.texts[text])
        self.columns.append(text + (f" AS {self._alias(name)}" if name else ""))
        self.texts.setdefault(text, len(self.columns) - 1)
        return Output(len(self.columns) - 1)

    def _no_set_returning(self, targets: Any) -> None:
        for target in targets:
            for call in _calls(target.val):
                if _name(call) in _SET_RETURNING:
                    raise self.refuse(f"the set-returning function {_name(call)}() next to aggregates across "
                                      "shards", "expand the set in a subquery in FROM")

    def _aggregate(self, call: Any, name: str | None, shown: bool = False) -> Output:
        kind = COMBINABLE[_name(call)]
        if call.agg_within_group:
            raise self.refuse(f"the ordered-set aggregate {_name(call)}() across shards",
                              "bind the shard key, or compute it in the application")
        if call.agg_order:
            raise self.refuse(f"{_name(call)}() with ORDER BY inside it across shards", "drop the ORDER BY")
        if call.agg_distinct and (kind != "count" or not self._on_shard_key(call)):
            raise self.refuse(f"{_name(call)}(DISTINCT ...) across shards",
                                  "only count(DISTINCT shard key) merges exactly: each key value is on "
                                  "one shard")
        text = self.deparse(call)
        alias = self._alias(name or _name(call))
        if kind == "avg":
            arg = ", ".join(self.deparse(a) for a in call.args or ())
            tail = f" FILTER (WHERE {self.deparse(call.agg_filter)})" if call.agg_filter is not None else ""
            sum_text = f"sum({arg}){tail}"
            count_text = f"count({arg}){tail}"
            self.columns.append(f"{sum_text} AS {alias}")
            total = len(self.columns) - 1
            count = self._hidden(count_text)
            return Output(total, "avg", count)
        if text in self.texts and not shown:
            return Output(self.texts[text], kind)
        self.columns.append(f"{text} AS {alias}")
        self.texts.setdefault(text, len(self.columns) - 1)
        return Output(len(self.columns) - 1, kind)

    def _on_shard_key(self, call: Any) -> bool:
        """count(DISTINCT key) where key is the shard key of a sharded table in FROM (not a
        subquery's column that happens to share the name)."""
        args: tuple[Any, ...] = call.args or ()
        if len(args) != 1 or _kind(args[0]) != "ColumnRef":
            return False
        names = [f.sval if _kind(f) == "String" else None for f in args[0].fields]
        sources = _from_sources(self.select.fromClause or ())
        tables = {alias: table for alias, table in sources if table in self.key_columns}
        if len(names) == 2:
            table = tables.get(names[0] or "")
            return table is not None and names[1] == self.key_columns[table]
        return len(names) == 1 and len(sources) == 1 and len(tables) == 1 and \
            names[0] == self.key_columns[next(iter(tables.values()))]

    def _condition(self, node: Any, output_of: Callable[[Any], int]) -> Any:
        kind = _kind(node)
        if kind == "BoolExpr":
            op = {0: "and", 1: "or", 2: "not"}[int(node.boolop)]
            return Logic(op, tuple(self._condition(arg, output_of) for arg in node.args))
        if kind == "NullTest":
            return IsNull(self._operand(node.arg, output_of), int(node.nulltesttype) == 1)
        if kind == "A_Expr" and int(node.kind) == 0 and len(node.name) == 1:
            op = node.name[0].sval
            if op in ("=", "<>", "!=", "<", "<=", ">", ">="):
                left, right = self._operand(node.lexpr, output_of), self._operand(node.rexpr, output_of)
                if not (isinstance(left, Ref) or isinstance(right, Ref)):
                    raise self.refuse(f"HAVING {self.deparse(node)}, a comparison of constants, across shards",
                                      "compare an aggregate or a grouped column with the constant")
                return Cmp("<>" if op == "!=" else op, left, right)
        raise self.refuse(f"HAVING {self.deparse(node)} across shards",
                          "HAVING may compare aggregates and grouped columns with constants "
                          "(=, <>, <, <=, >, >=, AND, OR, NOT, IS NULL)")

    def _operand(self, node: Any, output_of: Callable[[Any], int]) -> Any:
        kind = _kind(node)
        if kind == "TypeCast":
            raise self.refuse(f"HAVING with a cast ({self.deparse(node)}) across shards",
                              "compare without the cast, or filter in the application")
        if kind == "A_Const":
            if node.isnull:
                return Const(None)
            value = node.val
            inner = _kind(value)
            if inner == "Integer":
                return Const(str(value.ival))
            if inner == "Float":
                return Const(value.fval)
            if inner == "String":
                return Const(value.sval)
            if inner == "Boolean":
                return Const("t" if value.boolval else "f")
        if kind == "ParamRef":
            raise self.refuse("HAVING with a parameter across shards", "write the value in the query")
        return Ref(output_of(node))


def _sort_key(sort: Any, column: int) -> SortKey:
    descending = int(sort.sortby_dir) == 2
    nulls = int(sort.sortby_nulls)
    if sort.useOp:
        raise Unmergeable("ORDER BY ... USING across shards", "use ASC or DESC")
    return SortKey(column, descending, descending if nulls == 0 else nulls == 1)


def _int_const(node: Any, what: str) -> int | None:
    if node is None or (_kind(node) == "A_Const" and node.isnull):
        return None
    if _kind(node) == "A_Const" and _kind(node.val) == "Integer" and node.val.ival >= 0:
        return int(node.val.ival)
    if _kind(node) == "A_Const" and _kind(node.val) == "Float" and node.val.fval.isdigit():
        return int(node.val.fval)  # a bigint constant
    raise Unmergeable(f"{what} given by an expression or a parameter across shards",
                      f"write {what} as a number")


def _unused(params: tuple[int, ...]) -> str:
    """An OFFSET of 0 that names LIMIT/OFFSET parameters the shard query does not use."""
    return "OFFSET 0 * (" + " + ".join(f"coalesce(${p}::bigint, 0)" for p in params) + ")"


def _param(node: Any) -> int | None:
    """$n of a LIMIT or OFFSET given as a parameter (a cast on it allowed)."""
    if _kind(node) == "TypeCast":
        node = node.arg
    return int(node.number) if _kind(node) == "ParamRef" else None


def _from_sources(items: Any) -> list[tuple[str, str]]:
    """(alias or name, table) of every FROM item (through joins); subqueries as ("", "")."""
    out: list[tuple[str, str]] = []
    for item in items:
        kind = _kind(item)
        if kind == "JoinExpr":
            out += _from_sources((item.larg, item.rarg))
        elif kind == "RangeVar":
            out.append((item.alias.aliasname if item.alias else item.relname, item.relname))
        else:
            out.append(("", ""))
    return out


def _is_star(node: Any) -> bool:
    return _kind(node) == "ColumnRef" and _kind(node.fields[-1]) == "A_Star"


def _calls(node: Any) -> list[Any]:
    """Every FuncCall in an expression tree (not inside subqueries)."""
    return _nodes(node, "FuncCall")


def _nodes(node: Any, kind: str, into_subqueries: bool = False) -> list[Any]:
    """Every node of class ``kind`` in a tree; inside subqueries only with ``into_subqueries``."""
    found = []
    stack = [node]
    while stack:
        item = stack.pop()
        if item is None or isinstance(item, str | int | float | bool):
            continue
        if isinstance(item, tuple | list):
            stack.extend(item)
            continue
        name = _kind(item)
        if name == kind:
            found.append(item)
            if kind == "SubLink" and not into_subqueries:
                continue
        if not into_subqueries and name == "SelectStmt" and item is not node:
            continue
        for slot in getattr(item, "__slots__", ()):
            value = getattr(item, slot, None)
            if value is not None and not isinstance(value, str | int | float | bool):
                stack.append(value)
    return found


def _has(select: Any, attribute: str) -> bool:
    """Whether any FuncCall of the select list, HAVING or ORDER BY has ``attribute`` set."""
    nodes = [t.val for t in select.targetList] + [select.havingClause] + \
        [s.node for s in select.sortClause or ()]
    return any(getattr(call, attribute, None) is not None for call in _calls(nodes))
