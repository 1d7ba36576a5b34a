"""A multi-row INSERT split by shard: each place gets its own rows, cut from the client's
own text, with its parameters renumbered from $1; parameters outside the rows go to every
place. The cut must agree with pglast's tree of the same statement, whatever the rows hold."""

from __future__ import annotations

import pytest

from proxy.router.parse import _split_by_tokens, _split_by_tree, analyze, split_insert_params

CASES = [
    ("insert into t (a, b) values ($1, $2), ($3, $4), ($5, $6)", ("x", "y", "x")),
    ("insert into t (a, b) values ($1, 'x), ($9'), ($2, f(1, ($3))) returning a", ("x", "y")),
    ("INSERT INTO t (a, b) VALUES ($1, $2) , /* (a comment) */ ($3, $4) ON CONFLICT (a) DO UPDATE SET b = $5",
     ("x", "y")),
    ('insert into "T" ("a", "b") values ($2, $1), ($4, $3)', ("y", "x")),
    (("insert into t (a, b) select p0::bigint, p1 from (values ($1, $2, 0), ($3, $4, 1)) as s(p0, p1, n) "
      "order by n returning t.a"), ("x", "y")),
    ("insert into t (a, b) values ($1, E'\\\\'), ($2, 'é$3')", ("x", "y")),
]


@pytest.mark.parametrize(("sql", "places"), CASES)
def test_the_cut_of_the_text_agrees_with_the_tree(sql: str, places: tuple[str, ...]) -> None:
    by_tokens = _split_by_tokens(sql, places)
    assert by_tokens is not None
    by_tree = _split_by_tree(sql, places)
    for place, (text, numbers) in by_tokens.items():
        assert numbers == by_tree[place][1]
        # The same statement, as PostgreSQL's parser reads it.
        assert analyze(text).statements == analyze(by_tree[place][0]).statements


def test_parameters_are_renumbered_and_shared_ones_go_everywhere() -> None:
    split = split_insert_params("insert into t (a, b) values ($1, $2), ($3, $4) on conflict (a) do update set b = $5",
                                ("x", "y"))
    assert split["x"] == ("insert into t (a, b) values ($1, $2) on conflict (a) do update set b = $3", (1, 2, 5))
    assert split["y"] == ("insert into t (a, b) values ($1, $2) on conflict (a) do update set b = $3", (3, 4, 5))


def test_rows_the_scanner_cannot_count_fall_back_to_the_tree() -> None:
    # A VALUES before the rows (a CTE): the scanner's first VALUES is not the INSERT's.
    sql = "with c as (values (1)) insert into t (a) values ($1), ($2)"
    assert _split_by_tokens(sql, ("x", "y")) is None or _split_by_tokens(sql, ("x", "y")) == \
        _split_by_tree(sql, ("x", "y"))
