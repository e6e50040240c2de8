"""The durable task store: one SQLite file in the data dir.

Every change of a task is committed (WAL, synchronous=FULL) before anyone is told about it,
so a ``kill -9`` at any moment loses nothing that was acknowledged. A terminal transition
and its callback are written in one transaction: the callback cannot be forgotten.

Calls are synchronous and short; they run on the event loop thread, which also makes each
read-modify-write atomic with respect to the other coroutines.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dispatcher.states import TaskStatus, sources_of

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    status           TEXT NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    description      TEXT NOT NULL DEFAULT '',
    callback_url     TEXT,
    progress_callbacks INTEGER NOT NULL DEFAULT 0,
    options          TEXT NOT NULL DEFAULT '{}',
    idempotency_key  TEXT UNIQUE,
    audio_path       TEXT NOT NULL,
    video_path       TEXT NOT NULL,
    audio_name       TEXT NOT NULL DEFAULT '',
    video_name       TEXT NOT NULL DEFAULT '',
    media_seconds    REAL,
    node             TEXT,
    node_job_id      TEXT,
    stage            TEXT NOT NULL DEFAULT 'queued',
    progress         REAL NOT NULL DEFAULT 0,
    message          TEXT NOT NULL DEFAULT '',
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    attempt_log      TEXT NOT NULL DEFAULT '[]',
    error_message    TEXT,
    result_path      TEXT,
    result_size      INTEGER,
    stall_timeout_s  REAL,
    task_timeout_s   REAL,
    created_at       REAL NOT NULL,
    enqueued_at      REAL NOT NULL,
    started_at       REAL,
    attempt_started_at REAL,
    last_progress_at REAL,
    completed_at     REAL,
    expires_at       REAL,
    updated_at       REAL NOT NULL,
    files_expired    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks(status, priority DESC, enqueued_at, seq);
CREATE INDEX IF NOT EXISTS tasks_created ON tasks(created_at);
CREATE TABLE IF NOT EXISTS callbacks (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id         TEXT NOT NULL,
    url             TEXT NOT NULL,
    body            TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    delivered_at    REAL,
    gave_up_at      REAL,
    last_error      TEXT
);
CREATE INDEX IF NOT EXISTS callbacks_due ON callbacks(delivered_at, gave_up_at, next_attempt_at);
"""


@dataclass
class Task:
    id: str
    status: TaskStatus
    audio_path: str
    video_path: str
    max_attempts: int
    created_at: float
    enqueued_at: float
    updated_at: float
    priority: int = 0
    description: str = ""
    callback_url: str | None = None
    progress_callbacks: bool = False  # also POST progress while processing (best effort)
    options: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    audio_name: str = ""
    video_name: str = ""
    media_seconds: float | None = None
    node: str | None = None
    node_job_id: str | None = None
    stage: str = "queued"
    progress: float = 0.0
    message: str = ""
    attempts: int = 0
    attempt_log: list[dict[str, Any]] = field(default_factory=list)
    error_message: str | None = None
    result_path: str | None = None
    result_size: int | None = None
    stall_timeout_s: float | None = None
    task_timeout_s: float | None = None
    started_at: float | None = None
    attempt_started_at: float | None = None
    last_progress_at: float | None = None
    completed_at: float | None = None
    expires_at: float | None = None
    files_expired: bool = False
    seq: int | None = None


_JSON_COLUMNS = {"options", "attempt_log"}
_COLUMNS = [f.name for f in fields(Task) if f.name != "seq"]


def _to_row(values: Mapping[str, Any]) -> dict[str, Any]:
    row = {}
    for key, value in values.items():
        if key in _JSON_COLUMNS:
            value = json.dumps(value)
        elif isinstance(value, TaskStatus):
            value = value.value
        elif isinstance(value, bool):
            value = int(value)
        row[key] = value
    return row


def _from_row(row: sqlite3.Row) -> Task:
    data = dict(row)
    for key in _JSON_COLUMNS:
        data[key] = json.loads(data[key])
    data["status"] = TaskStatus(data["status"])
    data["files_expired"] = bool(data["files_expired"])
    data["progress_callbacks"] = bool(data["progress_callbacks"])
    return Task(**data)


@dataclass
class Callback:
    id: int
    task_id: str
    url: str
    body: dict[str, Any]
    attempts: int


class TaskStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- tasks ------------------------------------------------------------------------
    def insert(self, task: Task) -> Task:
        row = _to_row({c: getattr(task, c) for c in _COLUMNS})
        names = ", ".join(row)
        marks = ", ".join(f":{k}" for k in row)
        with self._tx() as db:
            cur = db.execute(f"INSERT INTO tasks ({names}) VALUES ({marks})", row)
        task.seq = cur.lastrowid
        return task

    def get(self, task_id: str) -> Task | None:
        row = self._db.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return _from_row(row) if row else None

    def get_many(self, task_ids: Iterable[str]) -> dict[str, Task]:
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            return {}
        marks = ", ".join("?" for _ in ids)
        rows = self._db.execute(f"SELECT * FROM tasks WHERE id IN ({marks})", ids)
        return {t.id: t for t in map(_from_row, rows)}

    def by_idempotency_key(self, key: str) -> Task | None:
        row = self._db.execute("SELECT * FROM tasks WHERE idempotency_key = ?", (key,)).fetchone()
        return _from_row(row) if row else None

    def queued(self) -> list[Task]:
        """Pending tasks in the order they start: higher priority first, then FIFO."""
        rows = self._db.execute(
            "SELECT * FROM tasks WHERE status = 'pending' ORDER BY priority DESC, enqueued_at, seq"
        )
        return [_from_row(r) for r in rows]

    def queue_fingerprint(self) -> tuple[int, float | None]:
        """Changes whenever a task joins, leaves or moves in the queue."""
        count, newest = self._db.execute(
            "SELECT COUNT(*), MAX(updated_at) FROM tasks WHERE status = 'pending'"
        ).fetchone()
        return count, newest

    def with_status(self, status: TaskStatus) -> list[Task]:
        rows = self._db.execute("SELECT * FROM tasks WHERE status = ? ORDER BY seq", (status,))
        return [_from_row(r) for r in rows]

    def page(
        self,
        status: TaskStatus | None = None,
        since: float | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[Task], int]:
        where: list[str] = ["1=1"]
        args: list[object] = []
        if status is not None:
            where.append("status = ?")
            args.append(status.value)
        if since is not None:
            where.append("created_at >= ?")
            args.append(since)
        clause = " AND ".join(where)
        total = self._db.execute(f"SELECT COUNT(*) FROM tasks WHERE {clause}", args).fetchone()[0]
        rows = self._db.execute(
            f"SELECT * FROM tasks WHERE {clause} ORDER BY seq DESC LIMIT ? OFFSET ?",
            [*args, limit, offset],
        )
        return [_from_row(r) for r in rows], total

    def counts(self) -> dict[str, int]:
        rows = self._db.execute("SELECT status, COUNT(*) FROM tasks GROUP BY status")
        return {status: n for status, n in rows}

    def update(self, task_id: str, **values: Any) -> None:
        """Change fields that are not the status (progress, stage, message, ...)."""
        assert "status" not in values, "use transition() to change the status"
        row = _to_row(values)
        sets = ", ".join(f"{k} = :{k}" for k in row)
        with self._tx() as db:
            db.execute(f"UPDATE tasks SET {sets} WHERE id = :_id", {**row, "_id": task_id})

    def transition(
        self,
        task_id: str,
        new: TaskStatus,
        callback: tuple[str, dict[str, Any], float] | None = None,
        **values: Any,
    ) -> Task | None:
        """Move a task to ``new`` if its current status allows it; None if it did not.

        ``callback`` (url, body, due time) is queued in the same transaction.
        """
        allowed = [s.value for s in sources_of(new)]
        row = _to_row({**values, "status": new})
        sets = ", ".join(f"{k} = :{k}" for k in row)
        marks = ", ".join(f":_s{i}" for i in range(len(allowed)))
        params = {**row, "_id": task_id, **{f"_s{i}": s for i, s in enumerate(allowed)}}
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE tasks SET {sets} WHERE id = :_id AND status IN ({marks})", params
            )
            if cur.rowcount == 0:
                return None
            if callback is not None:
                url, body, due = callback
                db.execute(
                    "INSERT INTO callbacks (task_id, url, body, next_attempt_at)"
                    " VALUES (?, ?, ?, ?)",
                    (task_id, url, json.dumps(body), due),
                )
        return self.get(task_id)

    def expired_files(self, cutoff: float) -> list[Task]:
        """Finished tasks older than ``cutoff`` whose files are still on disk."""
        rows = self._db.execute(
            "SELECT * FROM tasks WHERE files_expired = 0"
            " AND status IN ('completed', 'failed', 'cancelled')"
            " AND COALESCE(completed_at, updated_at) < ?",
            (cutoff,),
        )
        return [_from_row(r) for r in rows]

    def all_ids(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT id FROM tasks")}

    # -- callbacks --------------------------------------------------------------------
    def due_callbacks(self, now: float, limit: int = 20) -> list[Callback]:
        rows = self._db.execute(
            "SELECT id, task_id, url, body, attempts FROM callbacks"
            " WHERE delivered_at IS NULL AND gave_up_at IS NULL AND next_attempt_at <= ?"
            " ORDER BY next_attempt_at LIMIT ?",
            (now, limit),
        )
        return [Callback(r[0], r[1], r[2], json.loads(r[3]), r[4]) for r in rows]

    def next_callback_due(self) -> float | None:
        row = self._db.execute(
            "SELECT MIN(next_attempt_at) FROM callbacks"
            " WHERE delivered_at IS NULL AND gave_up_at IS NULL"
        ).fetchone()
        return row[0]

    def callback_delivered(self, callback_id: int, now: float) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE callbacks SET delivered_at = ?, attempts = attempts + 1 WHERE id = ?",
                (now, callback_id),
            )

    def callback_failed(
        self, callback_id: int, error: str, next_attempt_at: float | None, now: float
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE callbacks SET attempts = attempts + 1, last_error = ?,"
                " next_attempt_at = COALESCE(?, next_attempt_at),"
                " gave_up_at = CASE WHEN ? IS NULL THEN ? ELSE NULL END WHERE id = ?",
                (error, next_attempt_at, next_attempt_at, now, callback_id),
            )

    def callbacks_for(self, task_id: str) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT url, attempts, next_attempt_at, delivered_at, gave_up_at, last_error"
            " FROM callbacks"
            " WHERE task_id = ? ORDER BY id",
            (task_id,),
        )
        return [dict(r) for r in rows]
