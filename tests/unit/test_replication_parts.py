"""The pure parts of replication jobs: the seeds' job JSON, the names and connection strings
of logical replication, the target table made from a source's shape, a range's verdict."""

from __future__ import annotations

import pytest

from proxy.config import load_text
from proxy.errors import ConfigError
from proxy.replication.jobs import JobError, _from_spec, ad_hoc
from proxy.replication.logical import conninfo, name_of
from proxy.replication.verify import RangeCheck
from proxy.replication.watermark import Column, Shape, _after, _unescape

CONFIG = """
databases:
  primary: {dsn: "postgresql://u@127.0.0.1:1/p"}
  secondary: {dsn: "postgresql://u@127.0.0.1:1/s"}
default_database: primary
"""


def test_a_job_from_the_seeds_json() -> None:
    job = _from_spec({"sourceDatabase": "primary", "targetDatabases": ["secondary"], "tables": ["users"],
                      "syncKey": "created_at", "intervalMinutes": 15, "enabled": True}, stored=True)
    assert (job.id, job.source, job.targets, job.tables, job.sync_key, job.interval, job.mode) == \
        ("primary-users", "primary", ("secondary",), ("users",), "created_at", 900.0, "watermark")
    assert job.spec()["intervalMinutes"] == 15 and job.spec()["targetDatabases"] == ["secondary"]


@pytest.mark.parametrize(("spec", "says"), [
    ({"targetDatabases": ["s"], "tables": ["t"]}, "sourceDatabase"),
    ({"sourceDatabase": "p", "targetDatabases": "s", "tables": ["t"]}, "targetDatabases"),
    ({"sourceDatabase": "p", "targetDatabases": ["s"], "tables": []}, "tables"),
    ({"sourceDatabase": "p", "targetDatabases": ["s"], "tables": ["t"], "intervalMinutes": 0}, "intervalMinutes"),
    ({"sourceDatabase": "p", "targetDatabases": ["s"], "tables": ["t"], "mode": "magic"}, "mode"),
])
def test_a_bad_job_names_its_field(spec: dict[str, object], says: str) -> None:
    with pytest.raises(JobError) as caught:
        _from_spec(spec, stored=True)
    assert says in str(caught.value)


def test_an_ad_hoc_copy_names_real_databases() -> None:
    config = load_text(CONFIG)
    assert ad_hoc("t", "primary", ["secondary"], "updated_at", config).id == "table:t:primary"
    with pytest.raises(JobError, match="'nowhere' is not one of the databases"):
        ad_hoc("t", "primary", ["nowhere"], "updated_at", config)
    with pytest.raises(JobError, match="also a target"):
        ad_hoc("t", "primary", ["primary"], "updated_at", config)


def test_config_jobs_are_checked() -> None:
    base = CONFIG + "replication:\n  jobs:\n"
    with pytest.raises(ConfigError, match="cannot be a target"):
        load_text(base + "    - {id: j, source: primary, targets: [primary], tables: [t]}\n")
    with pytest.raises(ConfigError, match="another job"):
        load_text(base + "    - {id: j, source: primary, targets: [secondary], tables: [t]}\n"
                         "    - {id: j, source: primary, targets: [secondary], tables: [u]}\n")
    config = load_text(base + "    - {id: j, source: primary, targets: [secondary], tables: [t], mode: batch}\n")
    assert config.replication.jobs[0].mode == "batch"  # the seeds' word: watermark mode


def test_logical_names_are_valid_unique_and_quoted_safely() -> None:
    names = {name_of("Nightly Job!"), name_of("nightly job?"), name_of("x", "secondary")}
    assert len(names) == 3
    assert all(len(n) <= 63 and n.replace("_", "").isalnum() and n == n.lower() for n in names)
    info = conninfo(load_text(CONFIG).dsn("primary").__class__("h", 5, "o'neil", "p\\w'd", "db"))
    assert info == "host='h' port=5 dbname='db' user='o\\'neil' password='p\\\\w\\'d'"


def test_the_target_table_and_the_batch_position() -> None:
    shape = Shape('public."Orders"', (Column("id", "bigint", True), Column("region", "text", True),
                                      Column("at", "timestamp with time zone", False)),
                  ("region", "id"), "at", "timestamp with time zone")
    assert shape.create() == ('CREATE TABLE IF NOT EXISTS public."Orders" (\n    "id" bigint NOT NULL,\n    '
                              '"region" text NOT NULL,\n    "at" timestamp with time zone,\n    '
                              'PRIMARY KEY ("region", "id")\n)')
    assert _after(shape, None) == (' WHERE "at" IS NOT NULL', [])
    where, args = _after(shape, ("2026-01-01 00:00:00+00", ["eu", "7"]))
    assert where == (' WHERE "at" IS NOT NULL AND ("at", "region", "id") > ($1::text::timestamp with time zone, '
                     '$2::text::text, $3::text::bigint)')
    assert args == ["2026-01-01 00:00:00+00", "eu", "7"]
    assert shape.timed


def test_a_range_differs_when_its_count_or_checksum_does() -> None:
    same = RangeCheck("t", "a", None, "10", 5, 5, "123", "123")
    assert same.status == "ok"
    assert RangeCheck("t", "a", None, "10", 5, 4, "123", "100").status == "differs"
    assert RangeCheck("t", "a", None, "10", 5, 5, "123", "124").status == "differs"


def test_copy_text_values_are_unescaped() -> None:
    assert _unescape(b"plain") == "plain"
    assert _unescape(b"a\\tb\\nc\\\\d") == "a\tb\nc\\d"
    assert _unescape("caf\u00e9".encode()) == "caf\u00e9"


def test_https_takes_a_certificate_of_its_own_or_the_listeners() -> None:
    with pytest.raises(ConfigError, match="listen.tls is not set"):
        load_text(CONFIG + "http: {port: 9999, tls: listen}\n")
    with pytest.raises(ConfigError, match="http.max_requests_per_key"):
        load_text(CONFIG + "http: {port: 9999, max_requests_per_key: 0}\n")
    assert load_text(CONFIG + "http: {port: 9999}\n").http.tls is None
