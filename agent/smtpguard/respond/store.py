"""The agent's state in SQLite: each VM's detection record, every transition
(the offence history), and the last counter sample per VM. Each change is
one transaction, so a crash leaves either the old state or the new one."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict
from pathlib import Path
from typing import Any

from smtpguard.detect.machine import Transition, VmRecord
from smtpguard.errors import StoreError

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vms (
    vm TEXT PRIMARY KEY, state TEXT NOT NULL, since REAL NOT NULL, until REAL,
    reason TEXT NOT NULL, actor TEXT NOT NULL, manual_until REAL, flagged_until REAL,
    baseline REAL NOT NULL);
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY, vm TEXT NOT NULL, at REAL NOT NULL, old TEXT NOT NULL,
    new TEXT NOT NULL, until REAL, reason TEXT NOT NULL, actor TEXT NOT NULL,
    threshold TEXT, figures TEXT NOT NULL, offence INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS transitions_vm_at ON transitions (vm, at);
CREATE TABLE IF NOT EXISTS samples (
    vm TEXT PRIMARY KEY, at REAL NOT NULL, attempts INTEGER NOT NULL,
    blocked INTEGER NOT NULL, failed INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS incidents (
    id INTEGER PRIMARY KEY, vm TEXT NOT NULL, opened REAL NOT NULL, closed REAL,
    data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS incidents_vm_opened ON incidents (vm, opened);
"""
# Tables are only ever added (CREATE ... IF NOT EXISTS), so the schema stays 1:
# an older database gains the new ones when a newer agent opens it.


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(f"{path}: schema {row[0]}, this agent knows {SCHEMA_VERSION}")
            self.db.execute("PRAGMA quick_check").fetchone()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"opening {path}: {exc}") from exc

    def close(self) -> None:
        self.db.close()

    def records(self) -> dict[str, VmRecord]:
        try:
            rows = self.db.execute(
                "SELECT vm, state, since, until, reason, actor, manual_until, flagged_until, "
                "baseline FROM vms").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"reading {self.path}: {exc}") from exc
        return {r[0]: VmRecord(*r) for r in rows}

    def save(self, rec: VmRecord, transitions: list[Transition]) -> None:
        """The record and its transitions, in one transaction."""
        try:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute(
                    "INSERT OR REPLACE INTO vms VALUES (?,?,?,?,?,?,?,?,?)",
                    (rec.vm, rec.state, rec.since, rec.until, rec.reason, rec.actor,
                     rec.manual_until, rec.flagged_until, rec.baseline))
                for t in transitions:
                    self.db.execute(
                        "INSERT INTO transitions (vm, at, old, new, until, reason, actor, "
                        "threshold, figures, offence) VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (t.vm, t.at, t.old, t.new, t.until, t.reason, t.actor, t.threshold,
                         json.dumps(t.figures), t.offence))
        except sqlite3.Error as exc:
            raise StoreError(f"writing {self.path}: {exc}") from exc

    def blocks_at(self, vm: str) -> list[float]:
        """When the VM was blocked automatically (the escalation's memory)."""
        rows = self.db.execute(
            "SELECT at FROM transitions WHERE vm=? AND new='blocked' AND actor='auto' "
            "ORDER BY at", (vm,)).fetchall()
        return [r[0] for r in rows]

    def history(self, vm: str | None = None, since: float = 0.0,
                limit: int = 1000) -> list[Transition]:
        q = ("SELECT vm, old, new, at, until, reason, actor, threshold, figures, offence "
             "FROM transitions WHERE at >= ?")
        args: list[object] = [since]
        if vm is not None:
            q += " AND vm = ?"
            args.append(vm)
        rows = self.db.execute(q + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [Transition(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], json.loads(r[8]),
                           r[9]) for r in reversed(rows)]

    def save_samples(self, at: float, totals: dict[str, tuple[int, ...]]) -> None:
        try:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute("DELETE FROM samples")
                self.db.executemany("INSERT INTO samples VALUES (?,?,?,?,?)",
                                    [(vm, at, *v) for vm, v in totals.items()])
        except sqlite3.Error as exc:
            raise StoreError(f"writing {self.path}: {exc}") from exc

    def samples(self) -> dict[str, tuple[float, tuple[int, ...]]]:
        rows = self.db.execute("SELECT vm, at, attempts, blocked, failed FROM samples")
        return {r[0]: (r[1], (r[2], r[3], r[4])) for r in rows.fetchall()}


    def meta(self, key: str) -> str | None:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"reading {self.path}: {exc}") from exc
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        try:
            with self.db:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
        except sqlite3.Error as exc:
            raise StoreError(f"writing {self.path}: {exc}") from exc

    def rename_vm(self, old: str, new: str) -> bool:
        """Move everything kept under one VM key to another, in one
        transaction: the migration from interface names (and other naming of
        earlier versions) to stable ids. Nothing happens when the new key
        already has a record. True if anything moved."""
        try:
            with self.db:
                if self.db.execute("SELECT 1 FROM vms WHERE vm=?", (new,)).fetchone():
                    return False
                moved = self.db.execute("UPDATE vms SET vm=? WHERE vm=?", (new, old)).rowcount
                moved += self.db.execute("UPDATE transitions SET vm=? WHERE vm=?",
                                         (new, old)).rowcount
                moved += self.db.execute(
                    "UPDATE incidents SET vm=?, data=json_set(data, '$.vm', ?) WHERE vm=?",
                    (new, new, old)).rowcount
                if not self.db.execute("SELECT 1 FROM samples WHERE vm=?", (new,)).fetchone():
                    moved += self.db.execute("UPDATE samples SET vm=? WHERE vm=?",
                                             (new, old)).rowcount
        except sqlite3.Error as exc:
            raise StoreError(f"writing {self.path}: {exc}") from exc
        return moved > 0

    # -- incidents ------------------------------------------------------------
    def add_incident(self, vm: str, opened: float, data: dict[str, Any]) -> int:
        try:
            with self.db:
                cur = self.db.execute("INSERT INTO incidents (vm, opened, closed, data) "
                                      "VALUES (?,?,NULL,?)", (vm, opened, json.dumps(data)))
        except sqlite3.Error as exc:
            raise StoreError(f"writing {self.path}: {exc}") from exc
        return int(cur.lastrowid or 0)

    def update_incident(self, ident: int, data: dict[str, Any], closed: float | None) -> None:
        try:
            with self.db:
                self.db.execute("UPDATE incidents SET data=?, closed=? WHERE id=?",
                                (json.dumps(data), closed, ident))
        except sqlite3.Error as exc:
            raise StoreError(f"writing {self.path}: {exc}") from exc

    def incidents(self, vm: str | None = None, since: float = 0.0, open_only: bool = False,
                  limit: int = 1000) -> list[dict[str, Any]]:
        q = "SELECT id, data FROM incidents WHERE (opened >= ? OR closed IS NULL)"
        args: list[object] = [since]
        if vm is not None:
            q += " AND vm = ?"
            args.append(vm)
        if open_only:
            q += " AND closed IS NULL"
        try:
            rows = self.db.execute(q + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"reading {self.path}: {exc}") from exc
        return [{**json.loads(r[1]), "id": r[0]} for r in reversed(rows)]

    def incident(self, ident: int) -> dict[str, Any] | None:
        row = self.db.execute("SELECT id, data FROM incidents WHERE id=?", (ident,)).fetchone()
        return None if row is None else {**json.loads(row[1]), "id": row[0]}

    def prune_incidents(self, closed_before: float) -> int:
        try:
            with self.db:
                cur = self.db.execute("DELETE FROM incidents WHERE closed IS NOT NULL AND "
                                      "closed < ?", (closed_before,))
        except sqlite3.Error as exc:
            raise StoreError(f"writing {self.path}: {exc}") from exc
        return int(cur.rowcount)


def transition_dict(t: Transition) -> dict[str, object]:
    d = asdict(t)
    d["event"] = t.event
    return d
