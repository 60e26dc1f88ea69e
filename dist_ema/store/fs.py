"""The storage seam: one URL (+ storage_options) -> an fsspec filesystem, a root, a zarr store.

Everything the store does to objects goes through :class:`StoreIO`: put/get/list/remove
of small JSON objects and a zarr store over the same root for array data. URLs stay
``str`` (a ``Path`` would collapse ``s3://``). fsspec backends are imported lazily, so
local users never need s3fs. Transient errors are retried with exponential backoff;
permanent ones (permissions, missing bucket) are raised at once.
"""

from __future__ import annotations

import errno
import functools
import http.client
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from dist_ema.errors import ConfigError, DistEMAError

__all__ = [
    "PERMANENT",
    "TRANSIENT",
    "UNREACHABLE",
    "StoreError",
    "StoreIO",
    "StoreUnreachableError",
    "classify",
    "endpoint_of",
    "is_transient",
    "redact",
    "retry",
    "unreachable_message",
]

log = logging.getLogger("dist_ema")

T = TypeVar("T")

_SECRET_KEYS = ("secret", "token", "password", "key")


class StoreError(DistEMAError, RuntimeError):
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


# ------------------------------------------------------------------ retries, by type

TRANSIENT = "transient"  # worth retrying with backoff: throttling, 5xx, timeouts, dropped connections
UNREACHABLE = "unreachable"  # nothing answers at the endpoint (refused, no route, unknown host): fail fast
PERMANENT = "permanent"  # retrying cannot help: raised at once

# S3 (and S3-compatible) error codes that mean "try again"; any other code is permanent
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequests", "TooManyRequestsException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "ProvisionedThroughputExceededException", "InternalError", "ServiceUnavailable",
    "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "OperationAborted",
})
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_ERRNOS = frozenset(getattr(errno, n) for n in (
    "ECONNRESET", "ECONNABORTED", "ETIMEDOUT", "EPIPE", "EAGAIN", "EINTR", "EIO", "ENETRESET", "ENETDOWN", "EBUSY",
) if hasattr(errno, n))
_UNREACHABLE_ERRNOS = frozenset(getattr(errno, n) for n in (
    "ECONNREFUSED", "EHOSTUNREACH", "ENETUNREACH", "EHOSTDOWN", "EADDRNOTAVAIL",
) if hasattr(errno, n))
_PERMANENT_TYPES = (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)

UNREACHABLE_ATTEMPTS = 3  # tries before an unreachable endpoint is reported (a refusal is immediate)


def _net_types() -> dict[str, tuple[type, ...]]:
    """Exception types of the S3 stack (botocore, aiohttp), of the modules already imported.

    Never imports them: an exception of their types cannot exist before its module was loaded,
    and importing the S3 stack to classify a local error cost ~0.9 s per process.
    """
    import sys

    return _net_types_of("botocore.exceptions" in sys.modules, "aiohttp" in sys.modules)


@functools.lru_cache(maxsize=4)
def _net_types_of(boto: bool, aio: bool) -> dict[str, tuple[type, ...]]:
    out: dict[str, tuple[type, ...]] = {"client_error": (), "unreachable": (), "transient": (), "permanent": (),
                                        "connector": (), "aio_transient": (), "aio_permanent": (),
                                        "aio_response": ()}
    try:
        if not boto:
            raise ImportError
        import botocore.exceptions as b

        out["client_error"] = (b.ClientError,)
        # ConnectTimeoutError subclasses botocore's ConnectionError: "transient" is checked first
        from botocore.parsers import ResponseParserError  # throttling answers with broken XML (see s3fs)

        out["transient"] = (b.ConnectTimeoutError, b.ReadTimeoutError, b.HTTPClientError, ResponseParserError)
        out["unreachable"] = (b.EndpointConnectionError, b.ProxyConnectionError)
        out["permanent"] = (b.SSLError, b.NoCredentialsError, b.PartialCredentialsError, b.ParamValidationError,
                            b.NoRegionError)
    except ImportError:  # pragma: no cover - local-only installs
        pass
    try:
        if not aio:
            raise ImportError
        import aiohttp

        out["aio_permanent"] = tuple(t for t in (getattr(aiohttp, "ClientSSLError", None),
                                                 getattr(aiohttp, "InvalidURL", None)) if t)
        out["connector"] = (aiohttp.ClientConnectorError,)
        out["aio_transient"] = (aiohttp.ServerDisconnectedError, aiohttp.ServerTimeoutError,
                                aiohttp.ClientPayloadError, aiohttp.ClientOSError)
        out["aio_response"] = (aiohttp.ClientResponseError,)
    except ImportError:  # pragma: no cover
        pass
    return out


def _chain(e: BaseException) -> list[BaseException]:
    """e and the exceptions it was raised from (explicit cause, else the implicit context)."""
    out: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and len(out) < 8 and all(cur is not x for x in out):
        out.append(cur)
        cur = cur.__cause__ if cur.__cause__ is not None else (None if cur.__suppress_context__ else cur.__context__)
    return out


def _by_response(e: BaseException) -> str | None:
    """Classify an HTTP-level error by its S3 error code and status; None if e carries no response."""
    t = _net_types()
    if t["client_error"] and isinstance(e, t["client_error"]):
        resp = getattr(e, "response", None) or {}
        code = str((resp.get("Error") or {}).get("Code", ""))
        status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        try:
            status = int(status) if status is not None else (int(code) if code.isdigit() else None)
        except (TypeError, ValueError):
            status = None
        return TRANSIENT if code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS else PERMANENT
    if t["aio_response"] and isinstance(e, t["aio_response"]):
        return TRANSIENT if getattr(e, "status", None) in _TRANSIENT_STATUS else PERMANENT
    return None


# S3 error codes that mean the credentials were refused: permanent, reported as "access denied"
_ACCESS_DENIED_CODES = frozenset({
    "AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken",
    "InvalidSecurity", "AllAccessDisabled", "AccountProblem", "403", "Forbidden",
})
# a full disk or file-size limit (RLIMIT_FSIZE / ulimit -f) or quota: permanent, reported as such
_NO_SPACE_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EFBIG", "EDQUOT") if hasattr(errno, n))


def _s3_error(e: BaseException) -> tuple[str, int | None, str] | None:
    """(error code, HTTP status, server message) of the first S3 response in e's chain, or None."""
    t = _net_types()
    for x in _chain(e):
        if t["client_error"] and isinstance(x, t["client_error"]):
            resp = getattr(x, "response", None) or {}
            err = resp.get("Error") or {}
            status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            try:
                status = int(status) if status is not None else None
            except (TypeError, ValueError):
                status = None
            return str(err.get("Code", "")), status, str(err.get("Message", ""))
    return None


def _precondition_failed(e: BaseException) -> bool:
    """A conditional write refused with 412 (PreconditionFailed), however s3fs translated it.

    s3fs maps it to FileExistsError only when the answer names the condition (AWS, moto);
    SeaweedFS answers without it, which s3fs turns into ``OSError(EINVAL)``.
    """
    s3 = _s3_error(e)
    return s3 is not None and (s3[0] == "PreconditionFailed" or s3[1] == 412)


def _clear_permanent(e: BaseException, what: str) -> BaseException | None:
    """A clearer error of the same type for refused credentials and full disks (None: keep e as it is)."""
    s3 = _s3_error(e)
    if s3 is not None and (s3[0] in _ACCESS_DENIED_CODES or (s3[1] == 403 and not s3[0])):
        code, status, message = s3
        detail = " ".join(message.split())[:200] or "forbidden"
        return PermissionError(
            errno.EACCES,
            f"access denied ({code or status}: {detail}) to {what}: the store refused these credentials; check "
            f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or key/secret in storage_options) and "
            f"the bucket's permissions",
        )
    for x in _chain(e) if s3 is None else ():  # a local file system's errno (not an S3 answer s3fs mapped)
        if isinstance(x, OSError) and x.errno in _NO_SPACE_ERRNOS:
            cause = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "file too large (a file-size limit, "
                     "ulimit -f / RLIMIT_FSIZE, or the file system's)"}.get(x.errno, os.strerror(x.errno).lower())
            return OSError(x.errno, f"{cause}: {what} failed; free space (or raise the limit) on the store's disk")
    return None


def _by_type(e: BaseException) -> str | None:
    """Classify by exception type and errno; None when the type says nothing (look further down the chain)."""
    if isinstance(e, (StoreError, *_PERMANENT_TYPES)):
        return PERMANENT  # a StoreError was already retried, or is not about I/O
    t = _net_types()
    if t["permanent"] and isinstance(e, t["permanent"]):
        return PERMANENT
    if t["transient"] and isinstance(e, t["transient"]):
        return TRANSIENT
    if t["unreachable"] and isinstance(e, t["unreachable"]):
        return UNREACHABLE
    if t["aio_permanent"] and isinstance(e, t["aio_permanent"]):
        return PERMANENT
    if t["connector"] and isinstance(e, t["connector"]):
        inner = getattr(e, "os_error", None)
        if isinstance(inner, socket.gaierror) or (inner is not None and inner.errno in _UNREACHABLE_ERRNOS):
            return UNREACHABLE
        return TRANSIENT
    if t["aio_transient"] and isinstance(e, t["aio_transient"]):
        return TRANSIENT
    if isinstance(e, socket.gaierror):
        return UNREACHABLE  # host name not found
    if isinstance(e, ConnectionRefusedError):
        return UNREACHABLE
    if isinstance(e, (TimeoutError, ConnectionError, http.client.IncompleteRead)):
        return TRANSIENT
    if isinstance(e, OSError) and e.errno is not None:
        if e.errno in _UNREACHABLE_ERRNOS:
            return UNREACHABLE
        return TRANSIENT if e.errno in _TRANSIENT_ERRNOS else PERMANENT
    return None


def classify(e: BaseException) -> str:
    """TRANSIENT, UNREACHABLE or PERMANENT, by exception type, HTTP status / S3 error code and errno.

    The message text is never looked at (a permanent error about a key such as
    ``step-000000005000`` is not a 500). An S3 response anywhere in the chain decides
    (s3fs raises ``OSError(EIO)`` *from* the ClientError it could not map); otherwise the
    first exception in the chain whose type says something. Anything else is permanent.
    """
    chain = _chain(e)
    for x in chain:
        kind = _by_response(x)
        if kind is not None:
            return kind
    for x in chain:
        kind = _by_type(x)
        if kind is not None:
            return kind
    return PERMANENT


def is_transient(e: BaseException) -> bool:
    """True for errors worth retrying: throttling, 5xx, timeouts, dropped or refused connections."""
    return classify(e) != PERMANENT


class StoreUnreachableError(StoreError, ConnectionError):
    """Nothing answers at the store's endpoint (connection refused, no route, unknown host)."""


def endpoint_of(e: BaseException) -> str | None:
    """scheme://host:port of the endpoint an exception (or its cause) failed to reach, if it says."""
    from urllib.parse import urlsplit

    for x in _chain(e):
        url = (getattr(x, "kwargs", None) or {}).get("endpoint_url") if hasattr(x, "kwargs") else None
        if isinstance(url, str) and url:
            parts = urlsplit(url)
            return f"{parts.scheme}://{parts.netloc}" if parts.netloc else url
        host, port = getattr(x, "host", None), getattr(x, "port", None)
        if isinstance(host, str) and host:
            return f"{host}:{port}" if port else host
    return None


def _reason(e: BaseException) -> str:
    for x in _chain(e):
        if isinstance(x, socket.gaierror):
            return "host name not found"
        os_error = getattr(x, "os_error", None)
        if isinstance(os_error, socket.gaierror):
            return "host name not found"
        for err in (x, os_error):
            if isinstance(err, OSError) and err.errno in _UNREACHABLE_ERRNOS:
                return {errno.ECONNREFUSED: "connection refused"}.get(err.errno, os.strerror(err.errno).lower())
    return f"{type(e).__name__}: {_short(e)}"


def _short(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unreachable_message(e: BaseException, what: str, attempts: int | None = None) -> str:
    """One line: which endpoint could not be reached, for what, and where the endpoint comes from."""
    where = endpoint_of(e)
    tries = f" after {attempts} attempt(s)" if attempts else ""
    target = f"the storage endpoint {where}" if where else "the storage endpoint"
    return (f"cannot reach {target} ({_reason(e)}{tries}; {what}); check that the server is running and the "
            f"endpoint: FSSPEC_S3_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, or endpoint_url in storage_options")


def _retry_level() -> int:
    """Retry lines at WARNING on rank 0 (and in a single process), DEBUG on the other ranks."""
    return logging.WARNING if os.environ.get("RANK", "0") in ("", "0") else logging.DEBUG


def retry(fn: Callable[[], T], what: str, attempts: int = 6, base_delay: float = 0.2, max_delay: float = 10.0) -> T:
    """Call fn, retrying what :func:`classify` calls transient with jittered exponential backoff.

    Each retry is one log line (WARNING on rank 0, DEBUG elsewhere). An unreachable endpoint
    gets at most ``UNREACHABLE_ATTEMPTS`` short tries, then a :class:`StoreUnreachableError`
    (a StoreError and a ConnectionError) naming the endpoint. Permanent errors are raised at once.
    """
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            kind = classify(e)
            limit = {TRANSIENT: attempts, UNREACHABLE: min(attempts, UNREACHABLE_ATTEMPTS)}.get(kind, 1)
            if i + 1 >= limit:
                if kind == UNREACHABLE:
                    raise StoreUnreachableError(unreachable_message(e, what, i + 1)) from e
                clear = _clear_permanent(e, what) if kind == PERMANENT else None
                if clear is not None:
                    raise clear from e
                raise
            if kind == UNREACHABLE:
                delay = min(1.0, 0.25 * 2**i)
                why = f"cannot connect to {endpoint_of(e) or 'the endpoint'} ({_reason(e)})"
            else:
                delay = min(max_delay, base_delay * 2**i) * (0.5 + random.random())
                why = f"failed ({type(e).__name__}: {_short(e)})"
            log.log(_retry_level(), "dist-ema: %s: %s; attempt %d/%d, retry in %.1fs", what, why, i + 1, limit, delay)
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


def _s3_botocore_retries(opts: dict, total_attempts: int) -> bool:
    """Set botocore's own (silent) retries to ``total_attempts`` unless the user configured them.

    botocore's default ("legacy", 5 attempts with up to 8 s sleeps) made an unreachable endpoint
    cost ~10 s per attempt with no output; :func:`retry` retries (and says so) instead.
    """
    ck = dict(opts.get("config_kwargs") or {})
    if "retries" in ck or os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE"):
        return False
    ck["retries"] = {"mode": "standard", "total_max_attempts": total_attempts}
    opts["config_kwargs"] = ck
    return True


class StoreIO:
    """Objects under one URL.

    Args:
        url: local path, ``file://``, ``s3://bucket/prefix`` or any fsspec URL.
        storage_options: passed to the fsspec filesystem (endpoint_url, key, secret, ...);
            otherwise the usual environment applies (AWS_*, FSSPEC_S3_*).
        attempts: tries per operation for transient errors.
    """

    many_in_flight = 64  # get_many: reads in flight at once on async backends (s3fs)

    def __init__(self, url: str, storage_options: dict | None = None, *, attempts: int = 6) -> None:
        if not isinstance(url, str) or not url:
            raise ConfigError(f"store url must be a non-empty string; got {url!r}")
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
            # every call on this filesystem goes through retry(): no hidden retries below it
            quiet = _s3_botocore_retries(opts, 1)
        try:
            fs = fsspec.filesystem(self.protocol, **opts)
        except (ImportError, ValueError) as e:
            raise ImportError(f"no fsspec backend for {self.protocol}:// ({e}); install the matching package") from e
        if self.protocol == "s3" and quiet:
            fs.retries = 1  # s3fs's own loop (timeouts, SlowDown): retry() does it, one log line per attempt
        return fs

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
                    # zarr's reads are not all wrapped in retry(): a few quick botocore retries stay here
                    _s3_botocore_retries(opts, 3)
                self._zarr_store = zs.FsspecStore.from_url(f"{self.protocol}://{self.root}", storage_options=opts)
        return self._zarr_store

    # ------------------------------------------------------------------ objects

    def put(self, key: str, data: bytes | Sequence[Any], *, exclusive: bool = False,
            durable: bool | None = None) -> None:
        """Write one object. Local writes are atomic (temp file + rename).

        data: the bytes, or buffers written back to back (no copy into one object on local disk).

        exclusive: fail with FileExistsError if the object exists (conditional create
        where the backend supports it, e.g. S3 If-None-Match).
        durable: local files are fsynced before they appear (default: exclusive ones, the
        commit markers and the ownership record, so that a marker never outlives its data).
        """
        path = self.path(key)
        parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
        if self.protocol == "file":
            def local() -> None:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
                try:
                    with open(tmp, "wb") as f:
                        for part in parts:
                            f.write(part)
                        if exclusive if durable is None else durable:
                            f.flush()
                            os.fsync(f.fileno())
                    if exclusive:
                        os.link(tmp, path)  # atomic create-if-absent
                    else:
                        os.replace(tmp, path)
                        tmp = ""
                finally:
                    if tmp:  # a failed write (a full disk) leaves no temp file behind
                        try:
                            os.unlink(tmp)
                        except FileNotFoundError:
                            pass

            try:
                local()
            except FileExistsError:
                raise
            except OSError as e:
                clear = _clear_permanent(e, f"write {self.url}/{key}")
                if clear is None:
                    raise
                raise clear from e
            return
        if len(parts) != 1:
            data = b"".join(parts)

        def do() -> None:
            if exclusive:
                try:
                    self.fs.pipe_file(path, data, mode="create")
                    return
                except (TypeError, NotImplementedError):
                    if self.fs.exists(path):
                        raise FileExistsError(path) from None
                except OSError as e:
                    if isinstance(e, FileExistsError) or not _precondition_failed(e):
                        raise
                    raise FileExistsError(errno.EEXIST, f"{path} exists (the server refused the create-only "
                                                        f"write: 412 PreconditionFailed)", path) from e
            self.fs.pipe_file(path, data)

        retry(do, f"write {self.url}/{key}", self.attempts)

    def get(self, key: str) -> bytes:
        path = self.path(key)
        return retry(lambda: self.fs.cat_file(path), f"read {self.url}/{key}", self.attempts)

    def get_many(self, keys: list[str]) -> dict[str, bytes | Exception]:
        """Read many small objects at once (concurrently on async backends).

        Returns {key: bytes, or the permanent error of that object (FileNotFoundError: missing)}.
        Objects whose read failed transiently (throttling, a dropped connection) are read again,
        together, with :func:`retry`'s backoff; one still failing after the attempts is raised.
        """
        out: dict[str, bytes | Exception] = {}
        todo = list(keys)

        # async backends: a window of reads in flight (more only queue for the connection pool, holding memory)
        window = {"batch_size": self.many_in_flight} if getattr(self.fs, "async_impl", False) else {}

        def fetch() -> None:
            paths = [self.path(k) for k in todo]
            res = self.fs.cat(paths, on_error="return", **window)
            again = []
            for k, p in zip(todo, paths):
                v = res.get(p, FileNotFoundError(p)) if isinstance(res, dict) else res
                if isinstance(v, Exception) and classify(v) != PERMANENT:
                    again.append((k, v))
                else:
                    out[k] = v
            todo[:] = [k for k, _ in again]
            if again:
                raise again[0][1]

        if todo:
            retry(fetch, f"read {len(todo)} objects", self.attempts)
        return {k: out[k] for k in keys}

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
