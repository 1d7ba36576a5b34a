"""The audit log without PostgreSQL: the queue's bound, the line, the modes, the file's rotation.

The table sink needs a database: tests/integration/test_audit_writer.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from proxy.admin.audit import AuditLog, RotatingFile
from proxy.config import Audit, Duration, load_text
from proxy.errors import ConfigError
from proxy.router.parse import normalized

STARTED = 1700000000.123  # 2023-11-14T22:13:20.123Z
BOB = "select * from t where email = 'bob@example.com' and id = 42"
FIELDS = ["time", "key", "client", "databases", "route", "duration_ms", "rows", "sqlstate",
          "statement", "fingerprint"]


def record(log: AuditLog, statement: str = BOB, **kw: Any) -> None:
    args: dict[str, Any] = {"key": "pf_app", "client": "127.0.0.1:50000", "databases": ("primary",),
                            "route": "direct", "started": STARTED, "duration": 0.0015, "rows": 1,
                            "sqlstate": None, "statement": statement}
    args.update(kw)
    log.record(**args)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def written(tmp_path: Path, *statements: str, **config: Any) -> tuple[list[dict[str, Any]], str]:
    """The lines (decoded, and the file's text) for ``statements`` written through a whole log."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(Audit(path=str(path), **config))
    await log.start()
    for sql in statements:
        record(log, sql)
    await log.stop()
    assert log.written == len(statements) and log.dropped == 0
    return lines(path), path.read_text()


# -- the line


async def test_a_line_has_every_field_and_no_literal_in_normalized_mode(tmp_path: Path) -> None:
    (line,), text = await written(tmp_path, BOB)
    assert list(line) == FIELDS
    assert line == {"time": "2023-11-14T22:13:20.123Z", "key": "pf_app", "client": "127.0.0.1:50000",
                    "databases": ["primary"], "route": "direct", "duration_ms": 1.5, "rows": 1,
                    "sqlstate": None, "statement": "select * from t where email = $1 and id = $2",
                    "fingerprint": line["fingerprint"]}
    assert isinstance(line["fingerprint"], str) and line["fingerprint"]
    assert "bob@example.com" not in text and "42" not in text
    assert text.endswith("\n") and text.count("\n") == 1


async def test_full_mode_writes_the_text_as_sent(tmp_path: Path) -> None:
    (line,), _ = await written(tmp_path, BOB, statements="full")
    assert line["statement"] == BOB
    assert line["fingerprint"] == normalized(BOB)[1]


async def test_none_mode_writes_no_statement(tmp_path: Path) -> None:
    (line,), text = await written(tmp_path, BOB, statements="none")
    assert list(line) == FIELDS
    assert line["statement"] is None and line["fingerprint"] is None
    assert "bob" not in text


async def test_a_failed_statement_and_several_databases(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(Audit(path=str(path)))
    await log.start()
    record(log, "select * from users", databases=("primary", "secondary"), route="all", rows=None,
           sqlstate="42P01", duration=0.25)
    await log.stop()
    (line,) = lines(path)
    assert line["databases"] == ["primary", "secondary"]
    assert (line["route"], line["rows"], line["sqlstate"], line["duration_ms"]) == ("all", None, "42P01", 250.0)


async def test_text_that_does_not_parse_is_never_written_in_normalized_mode(tmp_path: Path) -> None:
    (line,), text = await written(tmp_path, "selec * from t where password = 'hunter2'")
    assert line["statement"] == "<unparsable>" and line["fingerprint"] is None
    assert "hunter2" not in text


@pytest.mark.parametrize(("sql", "secrets"), [
    (BOB, ["bob@example.com", "42"]),
    ("insert into t values (1001, 'alice'), (1002, 'carol')", ["1001", "1002", "alice", "carol"]),
    ("prepare q as select * from t where a = 'x1y' and b = 7731", ["x1y", "7731"]),
    ("execute q('lit9', 5512)", ["lit9", "5512"]),
    ("comment on table t is 'top secret'", ["top secret"]),
    ("copy t from '/srv/dump.csv'", ["/srv/dump.csv"]),
    ("alter role bob password 'hunter2'", ["hunter2"]),
    ("do $$ begin perform 'inner'; end $$", ["inner"]),
    ("select $tag$dollar$tag$, e'esc\\x41', x'1f', b'101', 3.14159", ["dollar", "esc", "1f", "101", "3.14159"]),
    ("/* pgfleet: shard_key=9071 */ select 1 /* 'c1' */ -- tail 'c2'", ["9071", "c1", "c2"]),
    ("select 1; select 'second'", ["second"]),
])
def test_normalized_text_keeps_no_literal_and_no_comment(sql: str, secrets: list[str]) -> None:
    text, signature = normalized(sql)
    assert signature is not None
    for secret in secrets:
        assert secret not in text, (sql, text)
    assert "/*" not in text and "--" not in text


def test_normalized_numbers_leftovers_after_the_parameters() -> None:
    assert normalized("select $1, 'x' /* c */, $3") == ("select $1, $4 , $3", normalized("select $1")[1])
    assert normalized("select a -- c\n  from t where b = 'q'")[0] == "select a from t where b = $1"
    assert normalized("BEGIN")[0] == "BEGIN"


# -- the queue


def test_record_drops_past_the_queue_size_counts_and_warns_once(caplog: pytest.LogCaptureFixture,
                                                                  tmp_path: Path) -> None:
    log = AuditLog(Audit(path=str(tmp_path / "audit.jsonl"), queue_size=3))
    with caplog.at_level(logging.WARNING, "pgfleet.audit"):
        for _ in range(7):
            record(log)
    assert (log.queued, log.dropped, log.written) == (3, 4, 0)
    warnings = [r.getMessage() for r in caplog.records if r.name == "pgfleet.audit"]
    assert warnings == [("audit log queue full: 1 statement(s) not logged; the writer cannot keep up "
                         f"with {tmp_path / 'audit.jsonl'}")]


async def test_queued_statements_are_written_and_later_drops_reported(caplog: pytest.LogCaptureFixture,
                                                                      tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(Audit(path=str(path), queue_size=2))
    with caplog.at_level(logging.WARNING, "pgfleet.audit"):
        for i in range(5):
            record(log, f"select {i}")
        await log.start()
        await log.stop()
    assert (log.written, log.dropped, log.queued) == (2, 3, 0)
    assert len(lines(path)) == 2
    messages = [r.getMessage() for r in caplog.records if r.name == "pgfleet.audit"]
    # the first drop at once; the two after it (within WARN_INTERVAL) when the log stops
    assert [m.split(";")[0] for m in messages] == ["audit log queue full: 1 statement(s) not logged",
                                                   "audit log queue full: 2 statement(s) not logged"]


async def test_a_stopped_log_drops_and_counts(tmp_path: Path) -> None:
    log = AuditLog(Audit(path=str(tmp_path / "audit.jsonl")))
    await log.start()
    await log.stop()
    record(log)
    assert (log.queued, log.dropped) == (0, 1)
    await log.stop()  # twice is harmless


async def test_a_log_without_sinks_is_off_and_free() -> None:
    log = AuditLog(Audit(statements="full"))
    assert not log.enabled
    await log.start()
    record(log)
    assert (log.queued, log.dropped, log.written) == (0, 0, 0)
    await log.stop()


async def test_many_statements_in_batches(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(Audit(path=str(path), queue_size=5000))
    await log.start()
    for i in range(2500):
        record(log, f"select * from t where id = {i}")
    await log.stop()
    assert (log.written, log.dropped) == (2500, 0)
    assert {line["statement"] for line in lines(path)} == {"select * from t where id = $1"}


async def test_a_failing_file_drops_then_comes_back(caplog: pytest.LogCaptureFixture, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(Audit(path=str(path), retry_interval=0.05))
    real_write = RotatingFile.write
    failing = True

    def write(self: RotatingFile, data: list[bytes]) -> None:
        if failing:
            raise OSError(28, "No space left on device")
        real_write(self, data)

    monkeypatch.setattr(RotatingFile, "write", write)
    with caplog.at_level(logging.WARNING, "pgfleet.audit"):
        await log.start()
        record(log, "select 1")
        await wait_for(lambda: log.dropped == 1)
        record(log, "select 2")  # while it rests: not tried, dropped
        await wait_for(lambda: log.dropped == 2)
        failing = False
        await asyncio.sleep(0.1)  # past retry_interval
        record(log, "select 3")
        await wait_for(lambda: log.written == 1)
        await log.stop()
    assert [line["statement"] for line in lines(path)] == ["select $1"]
    messages = [r.getMessage() for r in caplog.records if r.name == "pgfleet.audit"]
    assert len(messages) == 2, messages
    assert messages[0].startswith(f"audit log: cannot write to {path} (No space left on device)")
    assert messages[1] == f"audit log: writing to {path} again; 2 statement(s) were dropped meanwhile"


async def wait_for(condition: Any, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def test_a_file_that_cannot_be_opened_fails_the_start(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    log = AuditLog(Audit(path=str(tmp_path / "not-a-dir" / "audit.jsonl")))
    with pytest.raises(ConfigError) as err:
        await log.start()
    assert err.value.path == "audit.path"
    await log.stop()


async def test_the_file_is_created_with_its_directory_and_private(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.jsonl"
    log = AuditLog(Audit(path=str(path)))
    await log.start()
    await log.stop()
    assert path.exists() and (path.stat().st_mode & 0o777) == 0o600


# -- rotation


def test_rotation_by_size_keeps_backups(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    file = RotatingFile(str(path), max_bytes=100, backups=2)
    for i in range(10):
        file.write([f"line {i:02d} ".encode() + b"x" * 30 + b"\n"])  # 40 bytes: two per file
    file.close()
    assert sorted(os.listdir(tmp_path)) == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert [p.read_text().count("\n") for p in (path, Path(f"{path}.1"), Path(f"{path}.2"))] == [2, 2, 2]
    assert path.read_text().startswith("line 08")
    assert Path(f"{path}.1").read_text().startswith("line 06")
    assert Path(f"{path}.2").read_text().startswith("line 04")


def test_rotation_splits_a_batch_and_a_reopened_file_keeps_its_size(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    file = RotatingFile(str(path), max_bytes=100, backups=1)
    file.write([b"a" * 39 + b"\n"])
    file.close()
    file = RotatingFile(str(path), max_bytes=100, backups=1)
    file.write([b"b" * 39 + b"\n", b"c" * 39 + b"\n", b"d" * 39 + b"\n"])  # a, b fit; c and d start anew
    file.close()
    assert Path(f"{path}.1").read_text() == "a" * 39 + "\n" + "b" * 39 + "\n"
    assert path.read_text() == "c" * 39 + "\n" + "d" * 39 + "\n"


def test_rotation_without_backups_starts_the_file_again(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    file = RotatingFile(str(path), max_bytes=50, backups=0)
    file.write([b"a" * 39 + b"\n", b"b" * 39 + b"\n"])
    file.close()
    assert os.listdir(tmp_path) == ["audit.jsonl"]
    assert path.read_text() == "b" * 39 + "\n"


def test_a_line_longer_than_max_bytes_gets_a_file_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    file = RotatingFile(str(path), max_bytes=10, backups=3)
    file.write([b"short\n", b"x" * 30 + b"\n", b"short\n"])
    file.close()
    assert [Path(f"{path}{s}").read_text() for s in (".2", ".1", "")] == ["short\n", "x" * 30 + "\n", "short\n"]


async def test_the_log_rotates_its_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(Audit(path=str(path), max_bytes=1000, backups=3))
    await log.start()
    for i in range(40):
        record(log, f"select {i}", key=f"k{i}")
    await log.stop()
    files = [Path(f"{path}.{n}") for n in (3, 2, 1)] + [path]
    assert all(f.exists() and 0 < f.stat().st_size <= 1000 for f in files)
    keys = [line["key"] for f in files for line in lines(f)]
    assert keys == [f"k{i}" for i in range(40 - len(keys), 40)]  # the newest, in order


# -- configuration

CONFIG = """
databases:
  primary: {dsn: "postgresql://postgres@localhost:5432/bank"}
audit: %s
"""


def test_audit_defaults() -> None:
    config = load_text(CONFIG % "{}", env={})
    assert config.audit == Audit()
    assert (config.audit.path, config.audit.table, config.audit.statements) == (None, None, "normalized")
    assert (config.audit.max_bytes, config.audit.backups) == (100 * 1024 * 1024, 5)
    assert (config.audit.queue_size, config.audit.retry_interval) == (10000, 5.0)
    assert not AuditLog(config.audit).enabled


def test_audit_settings() -> None:
    config = load_text(CONFIG % "{path: a.jsonl, table: primary, statements: none, max_bytes: 0,"
                                " backups: 0, queue_size: 5, retry_interval: 250ms}", env={})
    assert config.audit == Audit(path="a.jsonl", table="primary", statements="none", max_bytes=0,
                                 backups=0, queue_size=5, retry_interval=Duration(0.25))


@pytest.mark.parametrize(("setting", "path", "reason"), [
    ("{table: nowhere}", "audit.table", "'nowhere' is not one of databases: primary"),
    ("{queue_size: 0}", "audit.queue_size", "must be at least 1"),
    ("{max_bytes: -1}", "audit.max_bytes", "cannot be negative (0: never rotate)"),
    ("{backups: -1}", "audit.backups", "cannot be negative"),
    ("{retry_interval: 0s}", "audit.retry_interval", "must be more than 0s"),
    ("{path: ''}", "audit.path", "empty: give a file path, or leave the key out"),
    ("{statements: some}", "audit.statements", "invalid enum value 'some'"),
    ("{rotate: yes}", "audit.rotate", "unknown key"),
])
def test_audit_settings_are_validated(setting: str, path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(CONFIG % setting, env={})
    assert (err.value.path, err.value.reason) == (path, reason)


def test_a_table_needs_a_way_to_its_database() -> None:
    with pytest.raises(ValueError, match="dsn_of"):
        AuditLog(Audit(table="primary"))
