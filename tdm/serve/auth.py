"""API keys: which keys are active, and a constant-time check of `Authorization: Bearer <key>`.

Keys come from a file (`ServeConfig.api_keys_file`: one key per line or comma-separated, `#` comments;
a mounted Kubernetes Secret) and from `$TDM_API_KEYS` (comma-separated). Several keys may be active at
once, so a key is rotated by adding the new one, moving clients, then removing the old one; the file is
re-read when it changes. Pure: no Ray, no FastAPI. See README, "Serving: authentication".
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger("ray.serve")

ENV = "TDM_API_KEYS"
#: how often (seconds) the key file's modification time is looked at
RECHECK_S = 1.0


def parse_keys(text: str) -> list[str]:
    """Keys in a file's or variable's text: split on newlines and commas, blanks and `#` comments dropped."""
    keys = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        keys += [k.strip() for k in line.split(",") if k.strip()]
    return keys


def is_loopback(host: str) -> bool:
    """Whether an address to bind is this machine's alone (localhost, 127.0.0.0/8, ::1)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_refusal(host: str, keyed: bool, insecure: bool) -> str | None:
    """Why serving on `host` is refused (secure by default: a non-loopback address needs API keys, or the
    operator's explicit --insecure-no-auth), or None when it may go ahead."""
    if is_loopback(host) or keyed or insecure:
        return None
    return (f"--host {host}: refusing to serve a non-loopback address without API keys; give --api-keys-file PATH "
            f"or ${ENV}, or --insecure-no-auth")


def _digest(key: str | bytes) -> bytes:
    # comparing fixed-length digests: compare_digest's time then depends on neither key's length
    return hashlib.sha256(key.encode("utf-8", "surrogatepass") if isinstance(key, str) else key).digest()


class APIKeys:
    """The active keys of one ingress replica. `enabled`: whether requests need a key at all (any key
    configured, or `required`: fail closed when none is)."""

    def __init__(self, path: str | None = None, env: str | None = None, required: bool = False):
        self.path = Path(path) if path else None
        self.env_keys = parse_keys(env if env is not None else os.environ.get(ENV, ""))
        self.required = required
        self._digests: tuple[bytes, ...] = ()
        self._stamp: tuple | None = None
        self._checked_at = 0.0
        self._lock = threading.Lock()
        self.error: str | None = None   # why the file could not be read (keys are then the env's only)
        self._reload(force=True)

    @property
    def enabled(self) -> bool:
        return self.required or self.path is not None or bool(self.env_keys)

    def __len__(self) -> int:
        self._reload()
        return len(self._digests)

    def _reload(self, force: bool = False) -> None:
        """Re-read the key file when its (mtime, size, inode) changed; at most once per RECHECK_S."""
        now = time.monotonic()
        if not force and now - self._checked_at < RECHECK_S:
            return
        with self._lock:
            self._checked_at = now
            file_keys: list[str] = []
            if self.path is not None:
                try:
                    st = self.path.stat()
                    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
                    if stamp == self._stamp and not force:
                        return
                    file_keys = parse_keys(self.path.read_text(encoding="utf-8"))
                    self._stamp, self.error = stamp, None
                except OSError as e:  # missing or unreadable: fail closed for the file's keys
                    self._stamp, self.error = None, f"api_keys_file {self.path}: {e.strerror or e}"
                    log.error("tdm: %s; only $%s keys are accepted", self.error, ENV)
            self._digests = tuple(_digest(k) for k in dict.fromkeys(self.env_keys + file_keys))

    def check(self, authorization: str | None) -> bool:
        """Whether an `Authorization` header value carries an active key (always True when auth is off).
        Constant time in the key: every active key is compared, with compare_digest on digests."""
        if not self.enabled:
            return True
        self._reload()
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        given = _digest(token.strip())
        ok = False
        for d in self._digests:  # no early exit: the time does not say which key (or whether one) matched
            ok |= hmac.compare_digest(given, d)
        return ok
