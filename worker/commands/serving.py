"""`isl serve`, `dicom-listener`, `worker`, `db` and `revoke-key`: the commands that run or administer the service's
processes on this machine (settings from ISL_* environment variables: docs/settings.md)."""
from __future__ import annotations

import json
import sys


def cmd_serve(args) -> int:
    from service.server import run

    run(args.host, args.port, workers=args.workers, log_level="info" if args.verbose else "warning")
    return 0

def cmd_dicom_listener(args) -> int:
    from pydantic import ValidationError

    from service.dimse import Listener
    from service.settings import Settings

    try:
        listener = Listener(Settings(), host=args.host)
    except (ValueError, ValidationError) as exc:
        print(f"isl dicom-listener: error: {exc}", file=sys.stderr)
        return 2
    listener.serve_forever()
    return 0

def cmd_db(args) -> int:
    """The database of job history and the audit trail: bring its schema up to date, or say where it is."""
    from jobstore.database import Records
    from service.settings import Settings

    records = Records(Settings().database())
    try:
        if args.action == "upgrade":
            records.upgrade(args.revision)
        print(json.dumps({"database": records.engine.url.render_as_string(hide_password=True),
                          "revision": records.revision()}))
    finally:
        records.close()
    return 0

def cmd_worker(args) -> int:
    import os

    if args.device:
        os.environ["ISL_DEVICE"] = args.device
    from worker.tasks import app, settings

    argv = ["worker", "--pool=prefork", "--concurrency=1", "-Q", args.queues or settings.queue,
            "--loglevel=INFO" if args.verbose else "--loglevel=WARNING"]
    if args.name:
        argv += ["-n", args.name]
    app.worker_main(argv)
    return 0

def cmd_revoke_key(args) -> int:
    """Revokes a tenant key at once on every API process sharing this Redis and database, for good (the key itself
    is read from stdin so that it stays out of shell history, or given as its sha256)."""
    from jobstore.store import open_store
    from service.settings import Settings, hash_key

    digest = args.sha256 or hash_key(sys.stdin.readline().strip())
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        print("isl revoke-key: error: --sha256 takes the 64 hex digits of the key's sha256", file=sys.stderr)
        return 2
    settings = Settings()
    store = open_store(settings.redis_url, settings.database())
    store.revoke(digest)  # the database first (it outlives Redis), then Redis
    print(json.dumps({"revoked": digest}))
    return 0


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the HTTP API (settings from ISL_* environment variables: docs/settings.md)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.set_defaults(func=cmd_serve)


def add_dicom_listener(sub) -> None:
    p = sub.add_parser("dicom-listener", help="run the DICOM C-STORE SCP: each series a PACS or router sends becomes a "
                                              "job (settings from ISL_* environment variables: docs/settings.md)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (the port is ISL_DIMSE_PORT)")
    p.set_defaults(func=cmd_dicom_listener)


def add_revoke_key(sub) -> None:
    p = sub.add_parser("revoke-key", help="revoke an API key now, on every API process (the key on stdin, or --sha256)")
    p.add_argument("--sha256", default=None, help="the key's sha256 (as in ISL_API_KEYS) instead of the key on stdin")
    p.set_defaults(func=cmd_revoke_key)


def add_db(sub) -> None:
    p = sub.add_parser("db", help="the database of job history and the audit trail (ISL_DATABASE_URL): migrate its "
                                  "schema, or show its revision; the API, workers and listener also migrate at start")
    p.add_argument("action", choices=["upgrade", "current"])
    p.add_argument("--revision", default="head", help="upgrade to this revision (default head)")
    p.set_defaults(func=cmd_db)


def add_worker(sub) -> None:
    p = sub.add_parser("worker", help="run one refinement worker (one per GPU) consuming the job queue")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="overrides ISL_DEVICE")
    p.add_argument("--name", default=None, help="Celery node name (default: celery@host)")
    p.add_argument("--queues", default=None, help="queues to consume, comma-separated (default: ISL_QUEUE, the "
                                                  "refinement jobs; add ISL_TRAIN_QUEUE, 'train', for retrainings)")
    p.set_defaults(func=cmd_worker)
