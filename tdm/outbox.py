"""Rank 0's writes into its MLflow run, sent by a background thread, so that an unreachable tracking
server neither stalls nor kills training (docs/architecture.md, "Tracking outages").

Every write is a `Record`: data, not a closure. Records wait in a bounded queue until the server takes
them; what it has not taken when training ends is saved as JSON lines next to the checkpoints
(`spill`) and sent by the next invocation of the same command (`replay`), before it registers.
"""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from .console import log
from .errors import first_line, redact

#: the directory, inside a run's storage directory, that holds unsent records
BACKLOG_DIR = "tracking-backlog"
#: metrics per log_batch call (MLflow's own limit is 1000)
BATCH = 1000
#: what one metric is counted as against the byte bound
METRIC_BYTES = 64
#: longest wait between two tries while the server is unreachable (seconds)
MAX_BACKOFF_S = 30.0


@dataclass
class Record:
    """One write into the run. kind: "metrics" (rows [key, value, timestamp_ms, step]), "tag" (key, value),
    "dict" (JSON `data` as artifact `name`), "image" (PNG bytes as image `name` at `step`), "file" (bytes as
    artifact `name` under `path`)."""

    kind: Literal["metrics", "tag", "dict", "image", "file"]
    name: str = ""
    value: str = ""
    path: str | None = None
    step: int = 0
    rows: list[list] = field(default_factory=list)
    data: Any = None

    @property
    def size(self) -> int:
        """Bytes counted against the bound."""
        if self.kind == "metrics":
            return METRIC_BYTES * len(self.rows)
        if isinstance(self.data, bytes):
            return len(self.data)
        return 256 + len(self.value) + (len(json.dumps(self.data)) if self.data is not None else 0)

    def to_json(self) -> str:
        d = {k: v for k, v in vars(self).items() if v not in (None, "", [], 0) or k == "kind"}
        if isinstance(self.data, bytes):
            d["data"] = {"base64": base64.b64encode(self.data).decode()}
        return json.dumps(d)

    @classmethod
    def from_json(cls, line: str) -> Record:
        d = json.loads(line)
        if isinstance(d.get("data"), dict) and set(d["data"]) == {"base64"} and d["kind"] in ("image", "file"):
            d["data"] = base64.b64decode(d["data"]["base64"])
        return cls(**d)


def shed(queue: deque[Record], total: int, max_bytes: int, start: int = 0) -> tuple[int, int]:
    """Drop records from queue[start:-1] (in place) until their sizes' `total` is at most `max_bytes`: sample
    grids ("image", "file": re-made at the next sample step) oldest first, then metrics oldest first; never a
    checkpoint record (tags, dicts), never the newest record, never one before `start` (being sent).
    Returns (records dropped, new total)."""
    dropped = 0
    for kinds in (("image", "file"), ("metrics",)):
        i = start
        while total > max_bytes and i < len(queue) - 1:
            if queue[i].kind in kinds:
                total -= queue[i].size
                del queue[i]
                dropped += 1
            else:
                i += 1
    return dropped, total


def send(client, run_id: str, records: list[Record], confirm=None) -> None:
    """Write `records` into run `run_id` with an MlflowClient, in order; consecutive metrics go in batches.
    `confirm(n)` is called as each group of n records is written, so a failure part-way leaves only the
    unwritten ones to retry (a sample grid is not logged twice)."""
    import tempfile
    from pathlib import Path

    from mlflow.entities import Metric

    rows: list[list] = []
    grouped = 0   # metrics records whose rows are in `rows`

    def flush_rows():
        nonlocal grouped
        for i in range(0, len(rows), BATCH):
            part = rows[i:i + BATCH]
            client.log_batch(run_id, metrics=[Metric(k, float(v), int(ts), int(s)) for k, v, ts, s in part])
        rows.clear()
        if grouped and confirm is not None:
            confirm(grouped)
        grouped = 0

    for r in records:
        if r.kind == "metrics":
            rows.extend(r.rows)
            grouped += 1
            continue
        flush_rows()
        if r.kind == "tag":
            client.set_tag(run_id, r.name, r.value)
        elif r.kind == "dict":
            client.log_dict(run_id, r.data, r.name)
        elif r.kind == "image":
            from PIL import Image

            client.log_image(run_id, Image.open(io.BytesIO(r.data)), key=r.name, step=r.step)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                f = Path(tmp) / r.name
                f.write_bytes(r.data)
                client.log_artifact(run_id, str(f), artifact_path=r.path)
        if confirm is not None:
            confirm(1)
    flush_rows()


class Outbox:
    """A bounded FIFO of Records for one run, drained by a daemon thread that retries with back-off
    while the server is unreachable. `put` never blocks and never raises for the server's sake."""

    def __init__(self, client, run_id: str, max_bytes: int, what: str = "MLflow"):
        self.client, self.run_id, self.max_bytes, self.what = client, run_id, max_bytes, what
        self.queue: deque[Record] = deque()
        self.bytes = 0
        self.dropped = 0          # records dropped at the bound, in all
        self.sent = 0
        self.failures = 0         # failed tries, in all
        self.outages = 0          # times the server went from reachable to unreachable
        self._down_since: float | None = None
        self._cond = threading.Condition()
        self._closing = False
        self._inflight = 0        # records at the head the thread is sending (never shed)
        self._thread = threading.Thread(target=self._run, name="tdm-outbox", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------- producer side
    def put(self, record: Record) -> None:
        with self._cond:
            self.queue.append(record)
            self.bytes += record.size
            self._shed()
            self._cond.notify()

    def _shed(self) -> None:
        dropped, self.bytes = shed(self.queue, self.bytes, self.max_bytes, start=self._inflight)
        self.dropped += dropped

    # ------------------------------------------------------------- the sender thread
    def _run(self) -> None:
        backoff = 1.0
        while True:
            with self._cond:
                while not self.queue and not self._closing:
                    self._cond.wait()
                if not self.queue:
                    return
                batch = [self.queue[i] for i in range(min(64, len(self.queue)))]
                self._inflight = len(batch)
            try:
                send(self.client, self.run_id, batch, confirm=self._confirm)
            except Exception as e:  # noqa: BLE001 - any failure of the server or the network: keep and retry
                with self._cond:
                    self._inflight = 0
                    self.failures += 1
                    if self._down_since is None:
                        self._down_since = time.monotonic()
                        self.outages += 1
                        log(f"{self.what} unreachable ({redact(first_line(e))}); training goes on, its tracking "
                            f"writes are kept (up to {self.max_bytes >> 20} MiB) and sent when it is back")
                    self._cond.wait(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
                continue
            backoff = 1.0

    def _confirm(self, n: int) -> None:
        """The first n records in flight are written: remove them from the head."""
        with self._cond:
            # only the thread removes the head, shedding never touches records in flight, and a close that
            # gave up on them set _inflight to 0
            n = min(n, self._inflight, len(self.queue))
            for _ in range(n):
                self.bytes -= self.queue.popleft().size
            self._inflight -= n
            self.sent += n
            if self._down_since is not None:
                log(f"{self.what} is back after {time.monotonic() - self._down_since:.0f}s; sending the "
                    f"{len(self.queue)} writes kept meanwhile")
                self._down_since = None
            self._cond.notify_all()

    # ------------------------------------------------------------- the end
    def close(self, timeout_s: float) -> list[Record]:
        """Wait up to `timeout_s` for every record to be sent; returns those that were not (to `spill`)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while self.queue and time.monotonic() < deadline:
                self._cond.wait(min(1.0, max(0.0, deadline - time.monotonic())))
            left = list(self.queue)
            self.queue.clear()   # the thread exits at its next look; a try in flight may still land (idempotent)
            self._inflight = 0
            self._cond.notify_all()
        return left


# ---------------------------------------------------------------- spill and replay (any pyarrow filesystem)

def _fs(storage_dir: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(storage_dir)


def spill(records: list[Record], storage_dir: str, tag: str) -> str:
    """Save unsent records as JSON lines in <storage_dir>/tracking-backlog/<tag>.jsonl; returns its URI."""
    fs, root = _fs(storage_dir)
    fs.create_dir(f"{root}/{BACKLOG_DIR}", recursive=True)
    path = f"{root}/{BACKLOG_DIR}/{tag}.jsonl"
    with fs.open_output_stream(path + ".tmp") as f:
        for r in records:
            f.write((r.to_json() + "\n").encode())
    fs.move(path + ".tmp", path)   # a backlog file is complete or absent
    return f"{storage_dir.rstrip('/')}/{BACKLOG_DIR}/{tag}.jsonl"


def backlog_files(storage_dir: str) -> list[str]:
    """Paths (in the storage's filesystem) of the saved backlog files of a run, oldest first."""
    import pyarrow.fs

    fs, root = _fs(storage_dir)
    found = fs.get_file_info(pyarrow.fs.FileSelector(f"{root}/{BACKLOG_DIR}", allow_not_found=True))
    return sorted(i.path for i in found if i.type == pyarrow.fs.FileType.File and i.path.endswith(".jsonl"))


def replay(client, run_id: str, storage_dir: str) -> int:
    """Send a run's saved backlog into it, oldest first, deleting each file once sent; returns the count.
    Sending twice is harmless: MLflow keeps one copy of an identical metric, tags and dicts overwrite."""
    fs, _ = _fs(storage_dir)
    n = 0
    for path in backlog_files(storage_dir):
        with fs.open_input_stream(path) as f:
            records = [Record.from_json(line) for line in f.read().decode().splitlines() if line.strip()]
        send(client, run_id, records)
        fs.delete_file(path)
        n += len(records)
    return n
