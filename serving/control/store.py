"""The control plane's tables (SQLAlchemy Core) and the database they live in.

SQLite in WAL mode by default: one writer, readers never blocked, and with synchronous=NORMAL a commit survives a
killed process (not a power cut, which PostgreSQL with its default fsync does survive). PostgreSQL by URL
(psycopg 3) when several replicas share one ledger. The schema is created on start; times are UNIX seconds (UTC)
as floats, so the same queries run on both.
"""
from __future__ import annotations

import os

import sqlalchemy as sa

metadata = sa.MetaData()

api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("key_id", sa.String(32), primary_key=True),  # public half of the key, shown in listings and logs
    sa.Column("key_hash", sa.String(64), nullable=False),  # sha256 of the whole key; the key itself is never stored
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),  # user | admin
    sa.Column("models", sa.Text, nullable=True),  # comma-separated allowlist; NULL: every model
    sa.Column("private", sa.Boolean, nullable=False),  # its data never leaves self-hosted routes
    sa.Column("rpm", sa.Integer, nullable=True),  # requests per minute; NULL: unlimited
    sa.Column("tpm", sa.Integer, nullable=True),  # tokens per minute; NULL: unlimited
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
)

requests = sa.Table(
    "requests", metadata,  # the ledger: one row per accepted request
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ts", sa.Float, nullable=False, index=True),  # when it finished
    sa.Column("request_id", sa.String(128), nullable=False, index=True),  # the id the client got back
    sa.Column("admission_id", sa.String(64), nullable=False, unique=True),  # the control plane's own id for it
    sa.Column("replica", sa.String(64), nullable=False),
    sa.Column("tenant", sa.String(128), nullable=False, index=True),
    sa.Column("key_id", sa.String(32), nullable=True),
    sa.Column("workflow", sa.String(128), nullable=True, index=True),
    sa.Column("task", sa.String(128), nullable=True, index=True),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("route", sa.String(256), nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("cached_tokens", sa.Integer, nullable=False),
    sa.Column("cost_usd", sa.Float, nullable=False),
    sa.Column("busy_s", sa.Float, nullable=False),  # its share of engine step time
    sa.Column("ttft_ms", sa.Float, nullable=True),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # ok | cancelled | failed
    sa.Column("error_code", sa.String(64), nullable=True),
    sa.Column("cache", sa.String(16), nullable=True),  # exact | semantic: a response cache answered; NULL: none
    sa.Column("saved_usd", sa.Float, nullable=True),  # what a cache hit saved (the original request's cost)
    sa.Column("tokens_saved", sa.Integer, nullable=True),  # prompt tokens the optimizer removed
    # a cascade's escalated answer: the route whose first answer was not confident enough; NULL: no escalation
    sa.Column("escalated_from", sa.String(128), nullable=True),
)

outcomes = sa.Table(
    "outcomes", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ts", sa.Float, nullable=False, index=True),
    sa.Column("tenant", sa.String(128), nullable=False, index=True),
    sa.Column("workflow", sa.String(128), nullable=True),
    sa.Column("task", sa.String(128), nullable=False, index=True),
    sa.Column("outcome", sa.String(16), nullable=False),  # resolved | escalated | failed
    sa.Column("quality", sa.Float, nullable=True),  # in [0, 1]
)

tool_calls = sa.Table(
    "tool_calls", metadata,  # reported by agents against their task budget
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("task", sa.String(128), nullable=False, index=True),
    sa.Column("count", sa.Integer, nullable=False),
)

engine_time = sa.Table(
    "engine_time", metadata,  # what the accelerator cost, busy or not: one row per replica and interval
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("replica", sa.String(64), nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("start_ts", sa.Float, nullable=False, index=True),
    sa.Column("end_ts", sa.Float, nullable=False),
    sa.Column("busy_s", sa.Float, nullable=False),  # engine step time within the interval
    sa.Column("usd_per_hour", sa.Float, nullable=False),
)


def open_database(url: str) -> sa.Engine:
    """An engine for `url` with the schema in place (created when missing)."""
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()
    else:
        engine = sa.create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4)
    try:
        metadata.create_all(engine)
    except sa.exc.IntegrityError:  # another replica created the same tables at the same moment
        metadata.create_all(engine)
    except sa.exc.ProgrammingError:
        metadata.create_all(engine)
    _add_missing_columns(engine)
    return engine


def _add_missing_columns(engine: sa.Engine) -> None:
    """A ledger written by an older version gains the nullable columns added since (create_all adds tables,
    never columns). Only nullable columns are ever added to these tables, so this is the whole migration."""
    inspector = sa.inspect(engine)
    with engine.begin() as conn:
        for table in metadata.sorted_tables:
            have = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in have:
                    assert column.nullable, f"{table.name}.{column.name} must be nullable to be added later"
                    kind = column.type.compile(dialect=engine.dialect)
                    conn.execute(sa.text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
