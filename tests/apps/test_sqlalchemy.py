"""SQLAlchemy 2's ORM and Alembic through pgfleet on a sharded fleet that starts empty: the
schema, bulk writes with explicit and server-side ids, reads, updates and deletes, as an
application does them, with two-phase commit. Every row is checked on its shard against
PostgreSQL's own PARTITION BY HASH placement, and every id for uniqueness across shards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Identity,
    String,
    create_engine,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from proxy.embedded import Cluster
from proxy.router.shard import shard_of
from tests.integration.conftest import KEYS, Fleet, sharded_on
from tests.integration.conftest import rows_on as on


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "app_users"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class Order(Base):
    __tablename__ = "app_orders"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("app_users.id"))
    note: Mapped[str] = mapped_column(String(50))


TABLES = {"app_users": "id", "app_orders": "user_id"}


@contextlib.contextmanager
def orm_fleet(pg: Cluster, shards: tuple[str, str], make_fleet: Any) -> Iterator[tuple[Fleet, Engine]]:
    """A pgfleet with two-phase commit on two empty shards, and an engine on it as an
    application would make one (only DATABASE_URL points at pgfleet)."""
    fleet: Fleet = make_fleet(**sharded_on(pg, shards, TABLES, two_phase_commit=True))
    engine = create_engine(f"postgresql+psycopg://pf_server:{KEYS['pf_server'][0]}@127.0.0.1:{fleet.port}/app")
    try:
        yield fleet, engine
    finally:
        engine.dispose()
    assert "Traceback" not in fleet.log()


def test_the_orm_from_an_empty_fleet(pg: Cluster, empty_shards: tuple[str, str], make_fleet: Any) -> None:
    a, b = empty_shards
    with orm_fleet(pg, empty_shards, make_fleet) as (_, engine):
        Base.metadata.create_all(engine)
        with Session(engine) as session:
            session.add_all([User(id=i, name=f"user {i}") for i in range(1, 1001)])
            session.commit()
        with Session(engine) as session:
            orders = [Order(user_id=(i % 1000) + 1, note=f"order {i}") for i in range(400)]
            session.add_all(orders)
            session.commit()
            assert all(order.id is not None for order in orders)
            assert len({order.id for order in orders}) == 400
        with Session(engine) as session:
            assert session.get(User, 5) is not None and session.get(User, 5).name == "user 5"
            assert session.scalar(select(func.count()).select_from(User)) == 1000
            assert session.scalar(select(func.count()).select_from(User).where(User.name.like("user 1%"))) == 112
            session.execute(update(User).where(User.id <= 10).values(name="renamed"))
            session.commit()
        with Session(engine) as session:
            for user in session.scalars(select(User).where(User.id.in_([3, 4, 5, 6]))):
                user.name = f"changed {user.id}"  # a flush of several objects: executemany
            session.commit()
            assert session.get(User, 4).name == "changed 4"
            for user in session.scalars(select(User).where(User.id.in_([997, 998, 999]))):
                session.delete(user)  # several objects: an executemany of DELETE over both shards
            session.commit()
            # A pipeline whose statement fails on one shard: PostgreSQL's error, the transaction
            # rolls back everywhere.
            for user in session.scalars(select(User).where(User.id.in_([7, 8, 900]))):
                session.delete(user)
            with pytest.raises(IntegrityError, match="app_orders_user_id_fkey"):
                session.commit()
            session.rollback()
            assert session.scalar(select(func.count()).select_from(User)) == 997
            session.execute(delete(Order).where(Order.user_id > 390))
            session.commit()
            assert session.scalar(select(func.count()).select_from(Order)) == 390
    for index, dbname in enumerate((a, b)):
        for (user_id,) in on(pg, dbname, "SELECT id FROM app_users"):
            assert shard_of(user_id, "bigint", 2, "hash") == index
        for (user_id,) in on(pg, dbname, "SELECT user_id FROM app_orders"):
            assert shard_of(user_id, "bigint", 2, "hash") == index
    ids = [row[0] for dbname in (a, b) for row in on(pg, dbname, "SELECT id FROM app_orders")]
    assert len(ids) == len(set(ids))


def test_alembic_operations_through_pgfleet(pg: Cluster, empty_shards: tuple[str, str], make_fleet: Any) -> None:
    """A migration's operations on a sharded table, in one transaction: on every shard or none."""
    from alembic.migration import MigrationContext
    from alembic.operations import Operations
    from sqlalchemy import Column, Text

    a, b = empty_shards
    with orm_fleet(pg, empty_shards, make_fleet) as (_, engine):
        Base.metadata.create_all(engine)

        def columns_and_indexes() -> list[tuple[Any, ...]]:
            return [(on(pg, db, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'app_users' "
                                "AND column_name = 'email'")[0][0],
                     on(pg, db, "SELECT count(*) FROM pg_indexes WHERE indexname = 'ix_app_users_email'")[0][0])
                    for db in (a, b)]

        with engine.begin() as conn:
            op = Operations(MigrationContext.configure(conn))
            op.add_column("app_users", Column("email", Text()))
            op.create_index("ix_app_users_email", "app_users", ["email"])
        assert columns_and_indexes() == [(1, 1), (1, 1)]
        with engine.begin() as conn:
            op = Operations(MigrationContext.configure(conn))
            op.drop_index("ix_app_users_email", table_name="app_users")
            op.drop_column("app_users", "email")
        assert columns_and_indexes() == [(0, 0), (0, 0)]
