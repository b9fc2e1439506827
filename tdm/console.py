"""What tdm prints: one-line job messages, and progress that reads well in a terminal, in a log file and
inside Ray workers (docs/architecture.md, "Terminal output").

- In a terminal, a loop in the local process shows a tqdm bar that is erased when it ends.
- Anywhere else (piped to a file, or inside a Ray task or actor, whose stdout the driver forwards line by
  line) progress is a plain `[tdm]` line at most every tenth of the way, rate-limited: nothing is redrawn,
  so a finished loop can never be drawn again over the job's summary.
- An entry point whose output is not a terminal strips terminal control sequences from everything the
  process prints, as click does (`install_output`): Ray's coloured prefixes, a library's bar.
- Ray forwards a task's output to the driver later than its result, so a task ends its output with a sync
  marker that the driver waits for before it prints the summary (`sync_marker`, `wait_for_sync`).
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time
from typing import Iterable


def log(msg: str) -> None:
    """A job message on stdout, prefixed `[tdm]` and flushed (Ray forwards worker stdout line by line).
    Written, not print()ed: Ray Train patches print in its workers to copy each line to stderr as well."""
    sys.stdout.write(f"[tdm] {msg}\n")
    sys.stdout.flush()


def line_due(n: int, total: int | None, last_n: int, since_last_s: float, *, every: float = 0.1,
             min_interval_s: float = 5.0, max_interval_s: float = 60.0) -> bool:
    """Whether a progress line is due after `n` of `total` items, the last line having shown `last_n` of them
    `since_last_s` seconds ago: at the end; on crossing the next `every` fraction of the total, if at least
    `min_interval_s` have passed; and every `max_interval_s` regardless, so that a slow loop shows it is alive.
    At most 1/every + 1 lines over a loop, plus one per `max_interval_s` of its duration."""
    if n <= last_n:
        return False
    if total and n >= total:
        return True
    if since_last_s >= max_interval_s:
        return True
    if total and since_last_s >= min_interval_s:
        return int(n / total / every) > int(last_n / total / every)
    return False


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class LineProgress:
    """A progress counter that writes `[tdm] <desc>: n/total (p%), <rate>, <eta> left` lines (line_due decides
    when) and a last line at the end of its loop or at close(), never more than one per count."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 initial: int = 0, clock=time.monotonic, write=log):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.clock, self.write = iterable, total, desc, clock, write
        # `initial`: items done before this process started (a resumed run); the rate counts from here
        self.n = self.shown = self.start_n = initial
        self.t0 = self.t_shown = clock()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if line_due(self.n, self.total, self.shown, self.clock() - self.t_shown):
            self._line()

    def _line(self) -> None:
        now = self.clock()
        done, spent = self.n - self.start_n, now - self.t0
        parts = [f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"]
        if done > 0 and spent > 0:
            per = spent / done
            parts.append(f"{per:.2f} s/it" if per >= 1 else f"{1 / per:.1f} it/s")
            if self.total and self.n < self.total:
                parts.append(f"{_duration(per * (self.total - self.n))} left")
            elif self.total:
                parts.append(f"done in {_duration(spent)}")
        self.write(f"{self.desc}: {', '.join(parts)}")
        self.shown, self.t_shown = self.n, now

    def close(self) -> None:
        """The last line, unless the last one shown was already this count (idempotent)."""
        if not self.closed:
            self.closed = True
            if self.n > self.shown:
                self._line()

    def __iter__(self):
        try:
            for x in self.iterable:  # type: ignore[union-attr]
                yield x
                self.update(1)
        finally:
            self.close()


def progress(iterable=None, *, total=None, desc: str = "", initial: int = 0, disable: bool = False):
    """A tqdm bar (erased at its end) when stderr is a terminal; LineProgress lines otherwise, which includes
    every Ray task and actor. `initial`: items already done (a resumed run)."""
    if not disable and not _is_terminal(sys.stderr):
        return LineProgress(iterable, total=total, desc=desc, initial=initial)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, initial=initial, disable=disable, mininterval=2, leave=False)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # a replaced or closed stream is not a terminal
        return False


#: CSI sequences (colours, cursor moves, erase) and the two-character escapes
_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


def plain_line(line: str) -> str | None:
    """What a terminal would leave visible of one output line (no newline): the text after its last carriage
    return, without escape sequences; None for a line that only drew and erased something (a finished bar)."""
    body = line.rstrip("\r")
    redrawn = "\r" in body
    body = _ESCAPE.sub("", body.rsplit("\r", 1)[-1])
    return None if redrawn and not body.strip() else body


#: the start of a sync marker line (sync_marker): a worker's last line, which the driver waits for and drops
_SYNC = "[tdm-sync:"


class OutputStream:
    """The entry point's stdout or stderr (install_output). Off a terminal (`plain`), it writes plain_line() of
    each line to `raw`: a partial line is held only while it is being redrawn (it holds a carriage return).
    In a terminal, it passes writes through. Either way it drops sync marker lines (sync_marker) and records
    their tokens for wait_for_sync. Thread-safe: Ray prints worker lines from a thread of the driver."""

    def __init__(self, raw, plain: bool):
        self.raw, self.plain, self._buf, self._lock = raw, plain, "", threading.Lock()
        self.synced: set[str] = set()
        self._synced = threading.Condition(self._lock)

    def write(self, s: str) -> int:
        with self._lock:
            self._buf += s
            *lines, self._buf = self._buf.split("\n")
            out = []
            for line in lines:
                if _SYNC in line:        # Ray put its "(task pid=...)" prefix before it
                    self.synced.add(line.split(_SYNC, 1)[1].split("]", 1)[0])
                    self._synced.notify_all()
                    continue
                text = plain_line(line) if self.plain else line
                if text is not None:
                    out.append(text + "\n")
            if not self.plain and _SYNC not in self._buf:   # a terminal draws partial lines as they come
                out.append(self._buf)
                self._buf = ""
            elif "\r" in self._buf:     # a bar redrawing in place: only its latest state can ever show
                self._buf = self._buf[self._buf.rindex("\r"):]
            if out:
                self.raw.write("".join(out))
        return len(s)

    def flush(self) -> None:
        with self._lock:
            if self._buf and "\r" not in self._buf and _SYNC not in self._buf:
                self.raw.write(_ESCAPE.sub("", self._buf) if self.plain else self._buf)
                self._buf = ""
            self.raw.flush()

    def wait_for(self, token: str, timeout_s: float) -> bool:
        with self._lock:
            return self._synced.wait_for(lambda: token in self.synced, timeout=timeout_s)

    def isatty(self) -> bool:
        return not self.plain and _is_terminal(self.raw)

    def __getattr__(self, name):   # encoding, fileno, buffer, ...: those of the real stream
        return getattr(self.raw, name)


def install_output() -> None:
    """Put sys.stdout and sys.stderr behind OutputStream: plain where they are not terminals (an entry point
    calls this first, before Ray or a library captures the streams)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, OutputStream):
            setattr(sys, name, OutputStream(stream, plain=not _is_terminal(stream)))


def sync_token() -> str | None:
    """A fresh token for a Ray task to end its output with (sync_marker), or None when this process's stdout
    cannot see markers (install_output was not called: a library caller), so that none is printed."""
    if not isinstance(sys.stdout, OutputStream):
        return None
    import uuid

    return f"{os.getpid()}-{uuid.uuid4().hex}"


def sync_marker(token: str | None) -> None:
    """(In a Ray task) the task's last line: the driver's OutputStream drops it and wait_for_sync returns.
    Ray forwards a worker's lines to the driver later than the task's result; without it, the task's last
    lines could print after the driver's summary."""
    if token is not None:
        sys.stdout.write(f"{_SYNC}{token}]\n")   # one word with digits: Ray never deduplicates it
        sys.stdout.flush()


def wait_for_sync(token: str | None, timeout_s: float = 10.0) -> bool:
    """Wait until the driver has printed everything a task wrote before its sync_marker(token); False on time
    out (a cluster that does not forward worker output to the driver)."""
    if token is None or not isinstance(sys.stdout, OutputStream):
        return False
    return sys.stdout.wait_for(token, timeout_s)


def quiet_libraries() -> None:
    """Silence per-file progress bars of transformers, diffusers and MLflow (tdm shows its own)."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    except ImportError:
        pass
