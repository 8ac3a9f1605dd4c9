"""A ledger written before the cache and optimizer columns existed opens with them added, its rows kept."""
import sqlalchemy as sa

from serving.control.store import open_database, requests


def test_an_older_ledger_gains_the_new_columns(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = sa.MetaData()
    sa.Table("requests", old, *[sa.Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                                for c in requests.columns if c.name not in ("cache", "saved_usd", "tokens_saved")])
    engine = sa.create_engine(url)
    old.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO requests (ts, request_id, admission_id, replica, tenant, model, route, "
                             "prompt_tokens, completion_tokens, cached_tokens, cost_usd, busy_s, latency_ms, status) "
                             "VALUES (1, 'r1', 'a1', 'x', 't', 'm', 'self-hosted:m', 1, 1, 0, 0.5, 0.1, 10, 'ok')"))
    engine.dispose()

    engine = open_database(url)
    columns = {c["name"] for c in sa.inspect(engine).get_columns("requests")}
    assert {"cache", "saved_usd", "tokens_saved"} <= columns
    with engine.begin() as conn:
        conn.execute(requests.insert().values(ts=2, request_id="r2", admission_id="a2", replica="x", tenant="t",
                                              model="m", route="cache:exact", prompt_tokens=1, completion_tokens=1,
                                              cached_tokens=0, cost_usd=0.0, busy_s=0.0, latency_ms=1, status="ok",
                                              cache="exact", saved_usd=0.5))
        rows = conn.execute(sa.select(requests.c.request_id, requests.c.cache).order_by(requests.c.ts)).fetchall()
    assert [tuple(r) for r in rows] == [("r1", None), ("r2", "exact")]
    open_database(url).dispose()  # a second start finds nothing to add
    engine.dispose()
