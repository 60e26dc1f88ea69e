"""The storage seam: one URL (+ storage_options) -> an fsspec filesystem, a root, a zarr store.

Everything the store does to objects goes through :class:`StoreIO`: put/get/list/remove
of small JSON objects and a zarr store over the same root for array data. URLs stay
``str`` (a ``Path`` would collapse ``s3://``). fsspec backends are imported lazily, so
local users never need s3fs. Transient errors are retried with exponential backoff;
permanent ones (permissions, missing bucket) are raised at once.
"""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["StoreError", "StoreIO", "is_transient", "redact", "retry"]

log = logging.getLogger("dist_ema")
T = TypeVar("T")

_SECRET_KEYS = ("secret", "token", "password", "key")


class StoreError(RuntimeError):
    """A store operation failed (after retries) or the store's content is not usable."""


def redact(options: dict | None) -> dict:
    """storage_options with credentials masked, for logs and error messages."""
    out: dict = {}
    for k, v in (options or {}).items():
        if isinstance(v, dict):
            out[k] = redact(v)
        elif any(s in k.lower() for s in _SECRET_KEYS) and k.lower() not in ("key_prefix",):
            out[k] = "***"
        else:
            out[k] = v
    return out


def is_transient(e: BaseException) -> bool:
    """True for errors worth retrying: timeouts, connection resets, throttling, 5xx."""
    if isinstance(e, (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(e, (TimeoutError, ConnectionError)):
        return True
    name = type(e).__name__
    text = str(e)
    transient_words = ("Timeout", "timed out", "Connection", "SlowDown", "Throttl", "503", "500", "502", "504",
                       "ServiceUnavailable", "InternalError", "RequestTimeTooSkewed", "EndpointConnectionError",
                       "ServerDisconnected", "ClientOSError", "IncompleteRead", "Reset")
    if any(w in name or w in text for w in transient_words):
        return True
    return isinstance(e, OSError) and e.errno in (None, 5, 104, 110, 111, 112, 113)  # EIO, resets, timeouts


def retry(fn: Callable[[], T], what: str, attempts: int = 6, base_delay: float = 0.2, max_delay: float = 10.0) -> T:
    """Call fn, retrying transient errors with jittered exponential backoff."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            if i == attempts - 1 or not is_transient(e):
                raise
            delay = min(max_delay, base_delay * 2**i) * (0.5 + random.random())
            log.warning("dist-ema: %s failed (%s: %s); retry %d/%d in %.1fs", what, type(e).__name__, e, i + 1,
                        attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _split_url(url: str) -> tuple[str, str]:
    if "://" not in url:
        return "file", os.path.abspath(os.path.expanduser(url))
    protocol, rest = url.split("://", 1)
    if protocol == "file":
        return "file", os.path.abspath(rest)
    return protocol, rest.rstrip("/")


def _s3_env_endpoint(opts: dict) -> None:
    """Honor FSSPEC_S3_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 read now (fsspec reads its env once, at import)."""
    if "endpoint_url" in opts or "endpoint_url" in opts.get("client_kwargs", {}):
        return
    url = os.environ.get("FSSPEC_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    if url:
        opts["endpoint_url"] = url


class StoreIO:
    """Objects under one URL.

    Args:
        url: local path, ``file://``, ``s3://bucket/prefix`` or any fsspec URL.
        storage_options: passed to the fsspec filesystem (endpoint_url, key, secret, ...);
            otherwise the usual environment applies (AWS_*, FSSPEC_S3_*).
        attempts: tries per operation for transient errors.
    """

    def __init__(self, url: str, storage_options: dict | None = None, *, attempts: int = 6) -> None:
        if not isinstance(url, str) or not url:
            raise ValueError(f"store url must be a non-empty string; got {url!r}")
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.attempts = attempts
        self.protocol, self.root = _split_url(url)
        if self.protocol == "memory":
            log.warning("dist-ema: memory:// stores are process-local; never use them across ranks")
        self.fs = self._make_fs()
        self._zarr_store: Any = None

    def __getstate__(self) -> dict:
        # picklable for the writer process: rebuild the filesystem there
        return {"url": self.url, "storage_options": self.storage_options, "attempts": self.attempts}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["url"], state["storage_options"], attempts=state["attempts"])  # type: ignore[misc]

    def _make_fs(self) -> Any:
        import fsspec

        if self.protocol == "file":
            return fsspec.filesystem("file", auto_mkdir=True)
        opts = dict(self.storage_options)
        if self.protocol == "s3":
            try:
                import s3fs  # noqa: F401
            except ImportError as e:
                raise ImportError(
                    "s3:// stores need s3fs: pip install 'dist-ema[s3]' (or pip install s3fs)"
                ) from e
            # one GET per object instead of HEAD + GET (zarr reads whole objects)
            opts.setdefault("max_concurrency", 1)
            _s3_env_endpoint(opts)
        try:
            return fsspec.filesystem(self.protocol, **opts)
        except (ImportError, ValueError) as e:
            raise ImportError(f"no fsspec backend for {self.protocol}:// ({e}); install the matching package") from e

    def __repr__(self) -> str:
        return f"StoreIO({self.url!r}, storage_options={redact(self.storage_options)!r})"

    # ------------------------------------------------------------------ paths

    def path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    @property
    def zarr_store(self) -> Any:
        """A zarr v3 store over the same root (created once per process)."""
        if self._zarr_store is None:
            import zarr.storage as zs

            if self.protocol == "file":
                self._zarr_store = zs.LocalStore(self.root)
            else:
                opts = dict(self.storage_options)
                if self.protocol == "s3":
                    opts.setdefault("max_concurrency", 1)
                    _s3_env_endpoint(opts)
                self._zarr_store = zs.FsspecStore.from_url(f"{self.protocol}://{self.root}", storage_options=opts)
        return self._zarr_store

    # ------------------------------------------------------------------ objects

    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        """Write one object. Local writes are atomic (temp file + rename).

        exclusive: fail with FileExistsError if the object exists (conditional create
        where the backend supports it, e.g. S3 If-None-Match).
        """
        path = self.path(key)
        if self.protocol == "file":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if exclusive:
                try:
                    os.link(tmp, path)  # atomic create-if-absent
                finally:
                    os.unlink(tmp)
            else:
                os.replace(tmp, path)
            return

        def do() -> None:
            if exclusive:
                try:
                    self.fs.pipe_file(path, data, mode="create")
                    return
                except (TypeError, NotImplementedError):
                    if self.fs.exists(path):
                        raise FileExistsError(path) from None
            self.fs.pipe_file(path, data)

        retry(do, f"write {self.url}/{key}", self.attempts)

    def get(self, key: str) -> bytes:
        path = self.path(key)
        return retry(lambda: self.fs.cat_file(path), f"read {self.url}/{key}", self.attempts)

    def get_many(self, keys: list[str]) -> dict[str, bytes | Exception]:
        """Read many small objects at once (concurrently on async backends)."""
        if not keys:
            return {}
        paths = [self.path(k) for k in keys]
        res = retry(lambda: self.fs.cat(paths, on_error="return"), f"read {len(keys)} objects", self.attempts)
        out: dict[str, bytes | Exception] = {}
        for k, p in zip(keys, paths):
            v = res.get(p, FileNotFoundError(p)) if isinstance(res, dict) else res
            out[k] = v
        return out

    def exists(self, key: str) -> bool:
        path = self.path(key)
        return retry(lambda: self.fs.exists(path), f"stat {self.url}/{key}", self.attempts)

    def list_dir(self, key: str) -> list[str]:
        """Names of the direct children of ``key`` ([] if it does not exist)."""
        path = self.path(key)

        def do() -> list[str]:
            try:
                self.fs.invalidate_cache(path)
                entries = self.fs.ls(path, detail=False)
            except FileNotFoundError:
                return []
            return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries})

        return retry(do, f"list {self.url}/{key}", self.attempts)

    def remove(self, key: str) -> None:
        """Remove an object or everything under a prefix; missing is fine."""
        path = self.path(key)

        def do() -> None:
            try:
                self.fs.rm(path, recursive=True)
            except FileNotFoundError:
                pass

        retry(do, f"remove {self.url}/{key}", self.attempts)
        if self.protocol == "file":
            self.fs.invalidate_cache()
