"""Retries by type: which store errors are retried, how often, and what the user sees while it retries.

The table holds real exception objects as the S3 stack raises them (botocore ClientError with an
error code and HTTP status, botocore/aiohttp connection errors, OSErrors with errnos, s3fs's
translation of a ClientError into an OSError), including permanent errors whose *text* holds words
that a substring match would take for a transient error (a key like ``step-000000005000``).
The end-to-end tests use a real refused port on 127.0.0.1 and the moto S3 server.
"""

from __future__ import annotations

import errno
import logging
import socket
import subprocess
import sys

import pytest

from dist_ema.store import fs as fsmod
from dist_ema.store.fs import PERMANENT, TRANSIENT, UNREACHABLE, StoreError, StoreIO, classify, is_transient, retry

botocore_exc = pytest.importorskip("botocore.exceptions")
aiohttp = pytest.importorskip("aiohttp")

KEY = "my-bucket/run/snapshots/step-000000005000/r00000/p0/c/0"


def client_error(code: str, status: int, message: str = "msg", op: str = "PutObject"):
    return botocore_exc.ClientError({"Error": {"Code": code, "Message": message},
                                     "ResponseMetadata": {"HTTPStatusCode": status}}, op)


def translated(code: str, status: int, message: str = "msg") -> BaseException:
    """What s3fs raises for a ClientError it has no mapping for: OSError(EIO) caused by the ClientError."""
    from s3fs.errors import translate_boto_error

    return translate_boto_error(client_error(code, status, message))


def connector_error(os_error: OSError):
    from aiohttp.client_reqrep import ConnectionKey

    key = ConnectionKey("127.0.0.1", 5999, False, True, None, None, None)
    return aiohttp.ClientConnectorError(key, os_error)


def chained(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__cause__ = inner
    return outer


CASES = [
    # --- S3 responses: by error code and HTTP status
    ("SlowDown 503", lambda: client_error("SlowDown", 503), TRANSIENT),
    ("Throttling 400", lambda: client_error("Throttling", 400), TRANSIENT),
    ("InternalError 500", lambda: client_error("InternalError", 500), TRANSIENT),
    ("ServiceUnavailable 503", lambda: client_error("ServiceUnavailable", 503), TRANSIENT),
    ("bad gateway 502, no code", lambda: client_error("502", 502), TRANSIENT),
    ("RequestTimeout 400", lambda: client_error("RequestTimeout", 400), TRANSIENT),
    ("429", lambda: client_error("TooManyRequests", 429), TRANSIENT),
    ("AccessDenied 403", lambda: client_error("AccessDenied", 403), PERMANENT),
    ("NoSuchBucket 404", lambda: client_error("NoSuchBucket", 404), PERMANENT),
    ("InvalidAccessKeyId 403", lambda: client_error("InvalidAccessKeyId", 403), PERMANENT),
    ("SignatureDoesNotMatch 403", lambda: client_error("SignatureDoesNotMatch", 403), PERMANENT),
    ("RequestTimeTooSkewed 403 (clock, not the network)", lambda: client_error("RequestTimeTooSkewed", 403),
     PERMANENT),
    ("PreconditionFailed 412", lambda: client_error("PreconditionFailed", 412), PERMANENT),
    # a permanent error whose message holds "500", "Connection", "Reset", "Timeout" in a key name
    ("InvalidArgument naming step-...5000 and Connection/Reset keys",
     lambda: client_error("InvalidArgument", 400, f"bad key {KEY}/Connection-Reset-Timeout-503"), PERMANENT),
    # --- s3fs's translation: OSError(EIO) caused by the ClientError: the code decides, not EIO
    ("s3fs-translated InternalError", lambda: translated("InternalError", 500), TRANSIENT),
    ("s3fs-translated InvalidArgument with 500 in the key", lambda: translated("InvalidArgument", 400,
                                                                                f"bad {KEY}"), PERMANENT),
    ("s3fs-translated AccessDenied (PermissionError)", lambda: translated("AccessDenied", 403), PERMANENT),
    ("s3fs-translated NoSuchKey (FileNotFoundError)", lambda: translated("NoSuchKey", 404), PERMANENT),
    # --- connection errors
    ("botocore EndpointConnectionError", lambda: botocore_exc.EndpointConnectionError(
        endpoint_url="http://127.0.0.1:5999/b/k"), UNREACHABLE),
    ("botocore ConnectTimeoutError", lambda: botocore_exc.ConnectTimeoutError(endpoint_url="http://h:1/b"),
     TRANSIENT),
    ("botocore ReadTimeoutError", lambda: botocore_exc.ReadTimeoutError(endpoint_url="http://h:1/b"), TRANSIENT),
    ("botocore ConnectionClosedError", lambda: botocore_exc.ConnectionClosedError(endpoint_url="http://h:1/b"),
     TRANSIENT),
    ("botocore NoCredentialsError", lambda: botocore_exc.NoCredentialsError(), PERMANENT),
    ("aiohttp connector: refused", lambda: connector_error(ConnectionRefusedError(errno.ECONNREFUSED, "refused")),
     UNREACHABLE),
    ("aiohttp connector: DNS", lambda: connector_error(socket.gaierror(socket.EAI_NONAME, "Name not known")),
     UNREACHABLE),
    ("aiohttp ServerDisconnectedError", lambda: aiohttp.ServerDisconnectedError(), TRANSIENT),
    ("aiohttp ClientOSError ECONNRESET", lambda: aiohttp.ClientOSError(errno.ECONNRESET, "reset by peer"),
     TRANSIENT),
    ("aiohttp ServerTimeoutError", lambda: aiohttp.ServerTimeoutError("read timed out"), TRANSIENT),
    ("EndpointConnectionError from ClientConnectorError (aiobotocore's chain)",
     lambda: chained(botocore_exc.EndpointConnectionError(endpoint_url="http://127.0.0.1:5999/b"),
                     connector_error(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))), UNREACHABLE),
    # --- OSError by errno
    ("ConnectionRefusedError", lambda: ConnectionRefusedError(errno.ECONNREFUSED, "refused"), UNREACHABLE),
    ("EHOSTUNREACH", lambda: OSError(errno.EHOSTUNREACH, "no route to host"), UNREACHABLE),
    ("ConnectionResetError", lambda: ConnectionResetError(errno.ECONNRESET, "reset"), TRANSIENT),
    ("ETIMEDOUT", lambda: OSError(errno.ETIMEDOUT, "timed out"), TRANSIENT),
    ("TimeoutError", lambda: TimeoutError("read timed out"), TRANSIENT),
    ("BrokenPipeError", lambda: BrokenPipeError(errno.EPIPE, "broken pipe"), TRANSIENT),
    ("OSError errno None (was retried before)", lambda: OSError("something broke"), PERMANENT),
    ("OSError errno None, 'Connection reset' in a key name", lambda: OSError(f"cannot parse {KEY}/Connection-Reset"),
     PERMANENT),
    ("ENOSPC", lambda: OSError(errno.ENOSPC, "No space left on device"), PERMANENT),
    ("EROFS", lambda: OSError(errno.EROFS, "Read-only file system"), PERMANENT),
    ("EACCES / PermissionError", lambda: PermissionError(errno.EACCES, "denied"), PERMANENT),
    ("FileNotFoundError with 500 in the key", lambda: FileNotFoundError(errno.ENOENT, "no such", KEY), PERMANENT),
    ("FileExistsError", lambda: FileExistsError(errno.EEXIST, "exists"), PERMANENT),
    # --- not I/O at all: the text must not matter
    ("ValueError 'Connection timed out 500'", lambda: ValueError("Connection timed out 500 Reset"), PERMANENT),
    ("KeyError of a step key", lambda: KeyError("step-000000005000"), PERMANENT),
    ("StoreError", lambda: StoreError("ServiceUnavailable 503 Connection Reset"), PERMANENT),
]


@pytest.mark.parametrize("make,want", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_classify(make, want):
    e = make()
    assert classify(e) == want, (type(e), e)
    assert is_transient(e) == (want != PERMANENT)


def _counting(make_error, succeed_after: int | None = None):
    calls = []

    def fn():
        calls.append(1)
        if succeed_after is not None and len(calls) > succeed_after:
            return "ok"
        raise make_error()

    return fn, calls


@pytest.fixture
def no_sleep(monkeypatch):
    """Record the back-off delays instead of sleeping them."""
    delays: list[float] = []
    monkeypatch.setattr(fsmod.time, "sleep", delays.append)
    return delays


def test_permanent_error_with_transient_words_is_not_retried(no_sleep, caplog):
    fn, calls = _counting(lambda: translated("InvalidArgument", 400, f"bad key {KEY} Connection Reset 503"))
    with caplog.at_level(logging.INFO, logger="dist_ema"), pytest.raises(OSError):
        retry(fn, f"write s3://{KEY}")
    assert len(calls) == 1 and no_sleep == [] and not caplog.records


def test_transient_error_is_retried_with_backoff_and_each_retry_is_one_line(no_sleep, caplog):
    fn, calls = _counting(lambda: client_error("SlowDown", 503, "Please reduce your request rate."),
                          succeed_after=3)
    with caplog.at_level(logging.INFO, logger="dist_ema"):
        assert retry(fn, "write s3://b/k", attempts=6) == "ok"
    assert len(calls) == 4 and len(no_sleep) == 3
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("\n" not in x and "write s3://b/k" in x and "SlowDown" in x for x in lines)
    assert [x for x in lines if "attempt 1/6" in x] and [x for x in lines if "attempt 3/6" in x]
    assert no_sleep[2] > no_sleep[0]  # exponential, with jitter of at most 2x


def test_transient_error_gives_up_after_attempts(no_sleep):
    fn, calls = _counting(lambda: client_error("InternalError", 500))
    with pytest.raises(botocore_exc.ClientError):
        retry(fn, "read s3://b/k", attempts=6)
    assert len(calls) == 6


def test_refused_connection_fails_fast_naming_the_endpoint(no_sleep, caplog):
    fn, calls = _counting(lambda: chained(
        botocore_exc.EndpointConnectionError(endpoint_url="http://127.0.0.1:5999/my-bucket/x/dist_ema.json"),
        connector_error(ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed"))))
    with caplog.at_level(logging.INFO, logger="dist_ema"), pytest.raises(StoreError) as ei:
        retry(fn, "read s3://my-bucket/x/dist_ema.json", attempts=6)
    assert 1 < len(calls) <= 3 and sum(no_sleep) <= 2.0
    msg = str(ei.value)
    assert "\n" not in msg and "http://127.0.0.1:5999" in msg and "/dist_ema.json\"" not in msg
    assert "connection refused" in msg and "FSSPEC_S3_ENDPOINT_URL" in msg
    assert isinstance(ei.value, ConnectionError)  # callers that catch OSError still catch it
    assert len(caplog.records) == len(calls) - 1


def test_retry_lines_only_on_rank_0(no_sleep, caplog, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    fn, _ = _counting(lambda: TimeoutError("read timed out"), succeed_after=1)
    with caplog.at_level(logging.DEBUG, logger="dist_ema"):
        retry(fn, "read s3://b/k")
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    monkeypatch.setenv("RANK", "0")
    fn, _ = _counting(lambda: TimeoutError("read timed out"), succeed_after=1)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="dist_ema"):
        retry(fn, "read s3://b/k")
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


# ------------------------------------------------------------------ real endpoints


def refused_port() -> int:
    """A port on 127.0.0.1 with nothing listening (bound once, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_store_io_on_a_refused_port(monkeypatch, caplog):
    pytest.importorskip("s3fs")
    port = refused_port()
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    io = StoreIO("s3://my-bucket/x")
    with caplog.at_level(logging.INFO, logger="dist_ema"), pytest.raises(StoreError) as ei:
        io.get("dist_ema.json")
    assert f"http://127.0.0.1:{port}" in str(ei.value) and "connection refused" in str(ei.value)
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert 1 <= len(retries) <= 2, [r.getMessage() for r in caplog.records]


@pytest.mark.dist
def test_cli_ls_on_a_refused_port():
    """`dist-ema ls` against an endpoint with nothing listening: retry lines, then one error line, exit 2."""
    pytest.importorskip("s3fs")
    port = refused_port()
    env = {"FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "dist_ema", "ls", "s3://my-bucket/x"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if "error:" in x]
    retries = [x for x in lines if "retry" in x]
    assert len(errors) == 1 and errors[0].startswith("dist-ema ls: error: ") and f"127.0.0.1:{port}" in errors[0]
    assert 1 <= len(retries) <= 2 and len(lines) == len(errors) + len(retries), lines


def test_moto_permanent_errors_are_not_retried(s3_env, caplog):
    """Against a real S3 server: a missing bucket and a missing key fail at once, without retries."""
    env, bucket = s3_env
    with caplog.at_level(logging.INFO, logger="dist_ema"):
        io = StoreIO(f"s3://{bucket}/run/snapshots/step-000000005000")
        with pytest.raises(FileNotFoundError):
            io.get("r00000/p0/c/0")
        io2 = StoreIO(f"s3://no-such-bucket-{bucket}/run")
        with pytest.raises(OSError):
            io2.put("dist_ema.json", b"{}")
        io.put("k", b"v")
        assert io.get("k") == b"v"
    assert not [r for r in caplog.records if "retry" in r.getMessage()]
