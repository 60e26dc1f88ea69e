"""A store with more than 1,000 snapshots: every committed one is listed, in order, locally and on S3.

The store holds 1,005 committed snapshots (more than one S3 listing page of 1,000 keys: a listing
that does not paginate misses some) and two torn ones (a data folder without its marker: the
newest step, a write in flight, and one in the middle). Three snapshots are written through the
API; the other markers by the real commit function. Expected values come from what the test wrote
and from plain reads of the markers' bytes. Requests are counted (every S3 API call of this
process; local listings and whole-file reads of the fsspec file system) so that a listing that
repeats itself per call or per snapshot fails here.
"""

from __future__ import annotations

import contextlib
import io as _io
import json
import math
import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dist_ema import PostHocEMA, open_store
from dist_ema.cli import main as cli_main
from dist_ema.errors import TargetError
from dist_ema.store.format import commit_key, data_prefix, group_doc, snapshot_id
from dist_ema.store.fs import StoreIO
from dist_ema.store.io import commit_snapshot

REAL = 3  # snapshots written through the API (steps 1..3)
COMMITTED = 1005  # committed snapshots in all
TORN = (700_000_005, 40_000)  # steps of folders without a marker: the newest (in flight) and one in the middle


def _steps() -> list[int]:
    """Committed steps: 1..3 from the API, then 10, 20, ... (names of 2 to 5 digits: their order is checked)."""
    return list(range(1, REAL + 1)) + [10 * i for i in range(1, COMMITTED - REAL + 1)]


def _make(url: str) -> dict:
    """The store: 3 snapshots through PostHocEMA, the other markers through commit_snapshot, 2 torn folders."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    with PostHocEMA(model, sigma_rels=(0.05, 0.10), store=url, writer="sync", update_impl="foreach") as ema:
        for _ in range(REAL):
            with torch.no_grad():
                model.weight.add_(0.1)
            ema.update()
            ema.snapshot()
    io = StoreIO(url)
    base = json.loads(io.get(commit_key(snapshot_id(REAL))))

    def commit(step: int) -> None:  # another job's attempt folder per snapshot, as a resumed run writes
        meta = dict(base, step=step, t=float(step), t_now=float(step), updates=step, attempt=f"j-many-{step}")
        commit_snapshot(io, snapshot_id(step), meta)

    def torn(step: int) -> None:
        io.put(f"{data_prefix(snapshot_id(step), f'j-torn-{step}')}/zarr.json", group_doc({}))

    extra = _steps()[REAL:]
    random.Random(0).shuffle(extra)  # written out of order
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(commit, extra))
        list(pool.map(torn, TORN))
    return base


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("many") / "store")
    return url, _make(url)


@pytest.fixture(scope="module")
def s3_store():
    """The store on a moto server of its own, in its own process (2,000 requests to build and a listing
    of 1,005 markers per test: an in-process server shares this process' GIL and took twice as long)."""
    pytest.importorskip("moto")
    s3fs = pytest.importorskip("s3fs")
    from bench.servers import start_moto, stop
    from tests.conftest import S3_KEY, S3_SECRET

    proc, endpoint = start_moto()
    env = {"FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
           "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, client_kwargs={"endpoint_url": endpoint}).mkdir("many")
            s3fs.S3FileSystem.clear_instance_cache()
            url = "s3://many/store"
            yield env, url, _make(url)
        s3fs.S3FileSystem.clear_instance_cache()
    finally:
        stop(proc)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.dist)])  # s3: a server process
def many(request, monkeypatch):
    """(url, the real snapshots' marker, request counter) of a store with 1,005 snapshots."""
    if request.param == "local":
        url, base = request.getfixturevalue("local_store")
        counter = request.getfixturevalue("local_requests")
    else:
        env, url, base = request.getfixturevalue("s3_store")
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        counter = request.getfixturevalue("s3_requests")
    counter.clear()
    return url, base, counter


@pytest.fixture
def s3_requests(monkeypatch):
    """Every S3 API call of this process (paginated listings page by page), by operation name."""
    from aiobotocore.client import AioBaseClient

    counts: Counter = Counter()
    orig = AioBaseClient._make_api_call

    async def counted(self, operation_name, api_params):
        counts[operation_name] += 1
        return await orig(self, operation_name, api_params)

    monkeypatch.setattr(AioBaseClient, "_make_api_call", counted)
    return counts


@pytest.fixture
def local_requests(monkeypatch):
    """Local listings and whole-object reads through fsspec, named like their S3 counterparts."""
    from fsspec.implementations.local import LocalFileSystem

    counts: Counter = Counter()
    for name, op in (("ls", "ListObjectsV2"), ("cat_file", "GetObject")):
        orig = getattr(LocalFileSystem, name)

        def counted(self, *a, _orig=orig, _op=op, **k):
            counts[_op] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(LocalFileSystem, name, counted)
    return counts


def _in_flight(store, monkeypatch) -> dict | None:
    """Track the most object reads in flight at once on an async file system (None: not async)."""
    fs = store.io.fs
    if not getattr(fs, "async_impl", False):
        return None
    orig, flight = fs._cat_file, {"now": 0, "most": 0}

    async def counted(*a, **k):
        flight["now"] += 1
        flight["most"] = max(flight["most"], flight["now"])
        try:
            return await orig(*a, **k)
        finally:
            flight["now"] -= 1

    monkeypatch.setattr(fs, "_cat_file", counted)
    return flight


def _markers(url: str, steps: list[int]) -> dict[int, dict]:
    """The markers of ``steps``, read plainly with fsspec (not through dist-ema's reader)."""
    import fsspec

    opts = {"client_kwargs": {"endpoint_url": os.environ["FSSPEC_S3_ENDPOINT_URL"]}} if url.startswith("s3") else {}
    fs, root = fsspec.core.url_to_fs(url, **opts)
    paths = [f"{root}/{commit_key(snapshot_id(s))}" for s in steps]
    return {json.loads(v)["step"]: json.loads(v) for v in fs.cat(paths).values()}


def _pages(folders: int) -> int:
    return math.ceil((folders + 1) / 1000)  # the snapshot folders and the group's zarr.json


def test_listing_finds_every_committed_snapshot_in_order(many, monkeypatch):
    url, base, counts = many
    store = open_store(url)
    flight = _in_flight(store, monkeypatch)
    counts.clear()
    snaps = store.snapshots()
    folders = COMMITTED + len(TORN)
    # one listing (a page per 1,000 keys on S3) and one read per marker: nothing repeated per snapshot
    assert counts["ListObjectsV2"] <= _pages(folders), counts
    assert counts["GetObject"] == folders, counts
    # the markers are read concurrently, a bounded window at a time (memory does not grow with the snapshots)
    assert flight is None or 8 <= flight["most"] <= StoreIO.many_in_flight, flight
    assert [s.step for s in snaps] == _steps()
    assert [s.id for s in snaps] == [snapshot_id(s) for s in _steps()]
    sample = random.Random(1).sample(range(COMMITTED), 40) + [0, 1, 2, COMMITTED - 1]
    plain = _markers(url, [snaps[i].step for i in sample])
    for i in sample:
        s, m = snaps[i], plain[snaps[i].step]
        assert (s.t, s.attempt, s.sigma_rels) == (m["t"], m["attempt"], tuple(p["sigma_rel"] for p in m["profiles"]))


def _cli(args: list[str]) -> tuple[int, list[str]]:
    buf = _io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli_main(args)
    return rc, buf.getvalue().splitlines()


def test_ls_lists_every_snapshot_reading_each_marker_once(many):
    url, _, counts = many
    rc, lines = _cli(["ls", url])
    assert rc == 0
    rows = [ln.split() for ln in lines if ln.startswith("step-")]
    assert [int(r[1]) for r in rows] == _steps()
    assert lines[-1] == f"{COMMITTED} committed snapshot(s) in {url}; {len(TORN)} uncommitted (ignored)"
    folders = COMMITTED + len(TORN)
    # the committed and the torn snapshots come from one listing: every marker is read once (plus the store's
    # own marker), not once for the table and again for the count of torn ones
    assert counts["GetObject"] <= folders + 1, counts
    assert counts["ListObjectsV2"] <= _pages(folders) + 4, counts  # + retired/ (on S3 a miss lists its parent)


def test_one_snapshot_is_found_without_reading_every_marker(many):
    url, base, counts = many
    store = open_store(url)
    counts.clear()
    newest = store.snapshot()
    assert newest.step == _steps()[-1]  # the newest committed: the torn folder above it is passed over
    assert counts["ListObjectsV2"] <= _pages(COMMITTED + len(TORN)), counts
    assert counts["GetObject"] <= 8, counts
    counts.clear()
    mid = store.snapshot(5000)
    assert (mid.step, mid.t, mid.attempt) == (5000, 5000.0, "j-many-5000")
    assert counts == Counter(GetObject=1), counts
    counts.clear()
    w = store.read(2, 0.05, "weight")  # a real snapshot, by step: one marker, its layout, its data
    assert w.shape == (3, 4)
    assert counts["ListObjectsV2"] == 0 and counts["GetObject"] <= 6, counts
    counts.clear()
    rc, lines = _cli(["inspect", url])
    assert rc == 0 and f"         step: {_steps()[-1]}" in lines
    assert counts["GetObject"] <= 12, counts
    if url.startswith("file") or "://" not in url:  # (on S3 the error's listing would double the test's time)
        with pytest.raises(TargetError, match=r"no committed snapshot at step 40000 .*steps: \[9930, "):
            store.snapshot(TORN[1])  # a torn folder is not a snapshot: the error lists the steps there are


def test_a_marker_read_that_fails_transiently_is_read_again(s3_env, monkeypatch):
    """Of the markers read at once, one answered with a throttling error (503 SlowDown): read again, listed."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    _, bucket = s3_env
    url = f"s3://{bucket}/store"
    _make_small(url, steps=(1, 2, 3, 4))
    store = open_store(url)
    orig, failed = store.io.fs._cat_file, []

    async def flaky(path, *a, **k):
        if path.endswith(f"{snapshot_id(3)}/commit.json") and not failed:
            failed.append(path)
            raise translate_boto_error(ClientError({"Error": {"Code": "SlowDown", "Message": "slow down"},
                                                    "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject"))
        return await orig(path, *a, **k)

    monkeypatch.setattr(store.io.fs, "_cat_file", flaky)
    assert [s.step for s in store.snapshots()] == [1, 2, 3, 4]
    assert failed  # the error was raised once, and the marker read again


def _make_small(url: str, steps: tuple[int, ...]) -> None:
    """Snapshots at ``steps`` through the API (a 2-parameter model)."""
    model = torch.nn.Linear(1, 1)
    with PostHocEMA(model, sigma_rels=(0.05, 0.10), store=url, writer="sync", update_impl="foreach") as ema:
        for step in range(1, max(steps) + 1):
            ema.update()
            if step in steps:
                ema.snapshot()
