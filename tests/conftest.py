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
