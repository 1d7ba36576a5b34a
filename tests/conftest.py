"""Session fixtures for real PostgreSQL: one embedded cluster shared by the whole test run.

This file owns only the cluster: started from the machine's PostgreSQL binaries in a temp dir
(as an unprivileged user when the tests run as root, see proxy/embedded.py), loaded with the
demo bank, and stopped at the end. It must never mock PostgreSQL nor hold pgfleet fixtures
(those live in tests/integration/conftest.py). Only tests that ask for `pg` pay for it.

Databases: `bank` and `secondary` (config/demo/bank.sql), `analytics` (config/demo/analytics.sql).
Roles for the backends' auth methods over TCP: `pf_trust` (trust), `pf_md5` (md5),
`pf_scram` (SCRAM); the superuser is `postgres` / `postgres` (SCRAM).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy.demo import ANALYTICS_SQL, BANK_SQL, load_sql
from proxy.embedded import Cluster, EmbeddedError

PG_DATABASES = {"bank": BANK_SQL, "secondary": BANK_SQL, "analytics": ANALYTICS_SQL}
# role -> (password, stored as md5?); pf_trust's password is never asked for.
PG_ROLES = {"pf_trust": ("trustpass", False), "pf_md5": ("md5pass", True),
            "pf_scram": ("scrampass", False)}
PG_GROUP = "pf_fleet"


def _grants(dbname: str) -> str:
    """Everything in `dbname` to the test roles, including what any of them creates later."""
    members = ", ".join(PG_ROLES)
    defaults = "\n".join(
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA public "
        f"GRANT ALL ON TABLES TO {PG_GROUP};\n"
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA public "
        f"GRANT ALL ON SEQUENCES TO {PG_GROUP};"
        for owner in ("postgres", *PG_ROLES))
    return f"""
GRANT ALL ON DATABASE {dbname} TO {PG_GROUP};
GRANT ALL ON SCHEMA public TO {PG_GROUP};
GRANT ALL ON ALL TABLES IN SCHEMA public TO {PG_GROUP};
GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {PG_GROUP};
{defaults}
GRANT {PG_GROUP} TO {members};
"""


@pytest.fixture(scope="session")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One running Cluster with the demo databases and the pf_* roles; stopped at session end."""
    cluster = Cluster("test", tmp_path_factory.mktemp("pg") / "data")
    try:
        cluster.start()
        cluster.psql(f"DO $$ BEGIN CREATE ROLE {PG_GROUP} NOLOGIN; "
                     f"EXCEPTION WHEN duplicate_object THEN NULL; END $$;")
        for role, (password, md5) in PG_ROLES.items():
            cluster.create_role(role, password, md5=md5)
        for dbname, sql in PG_DATABASES.items():
            load_sql(cluster, dbname, sql)
            cluster.psql(_grants(dbname), dbname=dbname)
    except EmbeddedError as exc:
        cluster.stop()
        pytest.fail(f"embedded PostgreSQL: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
