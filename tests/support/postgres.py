"""The PostgreSQL of the development and CI machines (127.0.0.1:5432, trust auth,
database `test`), and cleaning up what a test created in it."""

from __future__ import annotations

import anyio
import asyncpg

#: For asyncpg (and the PostgreSQL live backend's LISTEN connection).
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
#: For SQLAlchemy (the SQL history, `Broadcast("postgresql+asyncpg://...")`).
PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


async def drop_tables(prefix: str) -> None:
    """Drop every table whose name starts with `prefix` (a test's own, unique prefix)."""
    with anyio.fail_after(10):
        conn = await asyncpg.connect(PG_DSN)
        try:
            tables = await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE left(tablename, length($1)) = $1", prefix
            )
            for row in tables:
                await conn.execute(f'DROP TABLE IF EXISTS "{row["tablename"]}"')
        finally:
            await conn.close()
