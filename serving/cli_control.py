"""`frugal keys` and `frugal report`: the control plane from the command line, on the database the config names
(the same one the daemon uses)."""
from __future__ import annotations

import json
import sys


def _add_config(p) -> None:
    p.add_argument("--config", default=None, help="frugal.yaml whose control.database_url (or data_dir) to use")


def add_keys(sub) -> None:
    p = sub.add_parser("keys", help="create, list and revoke API keys")
    keys = p.add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="a new key; printed once (the last line of the output)")
    create.add_argument("--tenant", required=True, help="whose requests the key's calls are")
    create.add_argument("--role", default="user", choices=["user", "admin"],
                        help="admin keys may act for another tenant (x-frugal-tenant-id)")
    create.add_argument("--models", default=None, help="comma-separated models the key may use (default: all)")
    create.add_argument("--private", action="store_true", help="its data never leaves self-hosted routes")
    create.add_argument("--rpm", type=int, default=None, help="requests per minute")
    create.add_argument("--tpm", type=int, default=None, help="tokens per minute")
    create.add_argument("--json", action="store_true", help="print {key, key_id, tenant} as JSON")
    _add_config(create)
    listing = keys.add_parser("list", help="every key: id, tenant, role, limits, state (never the key itself)")
    listing.add_argument("--json", action="store_true")
    _add_config(listing)
    revoke = keys.add_parser("revoke", help="revoke a key by its id (takes effect within control.key_cache_s)")
    revoke.add_argument("key_id")
    _add_config(revoke)


def add_report(sub) -> None:
    p = sub.add_parser("report", help="cost by tenant, workflow, model or outcome, from the ledger")
    p.add_argument("--by", default="tenant", choices=["tenant", "workflow", "model", "outcome"])
    p.add_argument("--since", default="7d", help="how far back: 30m, 12h, 7d, 4w (default 7d)")
    p.add_argument("--json", action="store_true", help="JSON rows instead of a table")
    _add_config(p)


def _database(args):
    from serving.control.store import open_database
    from serving.server.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    try:
        return open_database(config.control.resolved_database_url()), config.control
    except Exception as e:  # unreachable database, bad URL
        print(f"error: cannot open the database: {getattr(e, 'orig', None) or e}", file=sys.stderr)
        return None


def cmd_keys(args) -> int:
    from serving.control.keys import KeyStore

    opened = _database(args)
    if opened is None:
        return 2
    store = KeyStore(opened[0])
    if args.keys_command == "create":
        models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
        try:
            key, record = store.create(args.tenant, args.role, models, args.private, args.rpm, args.tpm)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps({"key": key, "key_id": record.key_id, "tenant": record.tenant}))
        else:
            print(f"key {record.key_id} for tenant {record.tenant} ({record.role}); it is shown only once:")
            print(key)
        return 0
    if args.keys_command == "list":
        keys = store.list()
        if args.json:
            print(json.dumps([{"key_id": k.key_id, "tenant": k.tenant, "role": k.role, "models": k.models,
                               "private": k.private, "rpm": k.rpm, "tpm": k.tpm, "created_at": k.created_at,
                               "revoked_at": k.revoked_at} for k in keys]))
            return 0
        _print_keys(keys)
        return 0
    try:
        record = store.revoke(args.key_id)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    print(f"revoked key {record.key_id} of tenant {record.tenant}")
    return 0


def _print_keys(keys) -> None:
    import datetime as dt

    from rich.console import Console
    from rich.table import Table

    table = Table(title="API keys")
    for name in ("key id", "tenant", "role", "models", "private", "rpm", "tpm", "created", "state"):
        table.add_column(name)
    for k in keys:
        created = dt.datetime.fromtimestamp(k.created_at, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        table.add_row(k.key_id, k.tenant, k.role, ",".join(k.models) if k.models else "all", "yes" if k.private else "",
                      str(k.rpm or ""), str(k.tpm or ""), created, "revoked" if k.revoked_at else "active")
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def cmd_report(args) -> int:
    from serving.control.report import as_json, build_report, parse_since, render

    try:
        since_s = parse_since(args.since)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    opened = _database(args)
    if opened is None:
        return 2
    rows, machine = build_report(opened[0], args.by, since_s)
    if args.json:
        print(json.dumps(as_json(rows, machine)))
    else:
        render(rows, machine, args.by, args.since)
    return 0
