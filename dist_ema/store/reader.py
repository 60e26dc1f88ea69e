"""Reading a snapshot store: committed snapshots only, any region of any parameter."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dist_ema.store.fs import StoreError, StoreIO
from dist_ema.store.io import (
    array_key,
    buffer_key,
    ensure_store,
    missing_chunks,
    open_rank_array,
    read_commits,
    read_layout,
)
from dist_ema.store.layout import FORMAT_VERSION, Layout, Read, decode, plan_region

__all__ = ["Snapshot", "SnapshotStore", "open_store"]

log = logging.getLogger("dist_ema")


@dataclass(frozen=True)
class Snapshot:
    """One committed snapshot: the EMA of every tracked profile at time ``t``.

    Attributes:
        id: the snapshot's name in the store (``step-000000001000``).
        step: optimizer steps at the snapshot; ``t``: the EMA's time (steps or samples, see ``unit``).
        sigma_rels, gammas: the profiles stored, in array order (p0, p1, ...).
        meta: the full metadata document.
    """

    id: str
    step: int
    t: float
    unit: str
    sigma_rels: tuple[float, ...]
    gammas: tuple[float, ...]
    world_size: int
    layout_id: str
    dtype: str
    meta: dict = field(repr=False, compare=False)


def _snapshot_from_meta(snap: str, meta: dict) -> Snapshot:
    v = meta.get("version")
    if meta.get("format") != "dist-ema-snapshot" or not isinstance(v, int):
        raise StoreError(f"snapshot {snap}: not a dist-ema snapshot marker (format={meta.get('format')!r})")
    if v > FORMAT_VERSION:
        raise StoreError(
            f"snapshot {snap} has format version {v}; this dist-ema reads <= {FORMAT_VERSION}: upgrade dist-ema"
        )
    profs = meta["profiles"]
    return Snapshot(
        id=snap, step=int(meta["step"]), t=float(meta["t"]), unit=meta["unit"],
        sigma_rels=tuple(float(p["sigma_rel"]) for p in profs), gammas=tuple(float(p["gamma"]) for p in profs),
        world_size=int(meta["world_size"]), layout_id=meta["layout"], dtype=meta["dtype"], meta=meta,
    )


class SnapshotStore:
    """Read-only view of a dist-ema store.

    Example:
        >>> store = open_store("s3://bucket/run1/snapshots")
        >>> [s.step for s in store.snapshots()]
        >>> w = store.read(step=1000, sigma_rel=0.10, name="fc1.weight")   # full torch tensor
    """

    def __init__(self, url: str, storage_options: dict | None = None, *, io: StoreIO | None = None) -> None:
        self.io = io or StoreIO(url, storage_options)
        self.url = self.io.url
        ensure_store(self.io, create=False)
        self._layouts: dict[str, Layout] = {}
        self._index: dict[str, list] = {}

    def __repr__(self) -> str:
        return f"SnapshotStore({self.url!r})"

    # ------------------------------------------------------------------ listing

    def snapshots(self) -> list[Snapshot]:
        """Committed snapshots, oldest first. Torn ones (no commit marker) are not listed."""
        done, torn = read_commits(self.io)
        if torn:
            log.debug("dist-ema: %d uncommitted snapshot(s) in %s ignored: %s", len(torn), self.url, torn[:5])
        return [_snapshot_from_meta(c.snap, c.meta) for c in done]

    def retired(self) -> list[Snapshot]:
        """Snapshots of abandoned trajectories (a restart from an older training checkpoint), oldest first.

        They are kept under ``retired/<job>/`` and never used by synthesis; see docs/commit-protocol.md.
        """
        from dist_ema.store.io import read_retired

        return [_snapshot_from_meta(c.snap, c.meta) for _, _, snaps in read_retired(self.io) for c in snaps]

    def torn(self) -> list[str]:
        return read_commits(self.io)[1]

    def snapshot(self, step: int | None = None) -> Snapshot:
        """The committed snapshot at ``step`` (default: the newest)."""
        snaps = self.snapshots()
        if not snaps:
            raise StoreError(f"no committed snapshot in {self.url}; train with store=... and snapshot_every=...")
        if step is None:
            return snaps[-1]
        for s in snaps:
            if s.step == step:
                return s
        raise ValueError(f"no committed snapshot at step {step} in {self.url}; steps: {[s.step for s in snaps][-10:]}")

    def layout(self, snap: Snapshot) -> Layout:
        if snap.layout_id not in self._layouts:
            lay = read_layout(self.io, snap.layout_id, snap.world_size)
            if lay.layout_id() != snap.layout_id:
                raise StoreError(f"layout {snap.layout_id} in {self.url} does not match its id: the store is damaged")
            self._layouts[snap.layout_id] = lay
            self._index[snap.layout_id] = lay.piece_index()
        return self._layouts[snap.layout_id]

    def params(self, snap: Snapshot | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
        """{fqn: (shape, dtype)} of the model in a snapshot (default: the newest)."""
        lay = self.layout(snap or self.snapshot())
        return {f: (s, d) for f, s, d in lay.params}

    def profile_index(self, snap: Snapshot, sigma_rel: float | None = None, gamma: float | None = None) -> int:
        for k, (s, g) in enumerate(zip(snap.sigma_rels, snap.gammas)):
            if (sigma_rel is not None and abs(s - sigma_rel) <= 1e-6 * sigma_rel) or (
                gamma is not None and abs(g - gamma) <= 1e-9 * max(1.0, gamma)
            ):
                return k
        raise ValueError(f"snapshot {snap.id} has no profile sigma_rel={sigma_rel} gamma={gamma}; "
                         f"it has sigma_rels {list(snap.sigma_rels)}")

    # ------------------------------------------------------------------ reading

    def rank_array(self, snap: Snapshot, rank: int, profile: int):
        lay = self.layout(snap)
        return open_rank_array(
            self.io, array_key(snap.id, rank, profile), lay.rank_numel(rank), snap.dtype,
            snap.meta.get("compression"), int(snap.meta["max_object_bytes"]),
        )

    def read_reads(self, snap: Snapshot, profile: int, reads: Sequence[Read], out: np.ndarray) -> int:
        """Execute reads (rank array -> out) for one profile; one ranged read per source rank. Returns bytes."""
        by_rank: dict[int, list[Read]] = defaultdict(list)
        for rd in reads:
            by_rank[rd.rank].append(rd)
        nbytes = 0
        for r, rds in by_rank.items():
            lo = min(rd.src for rd in rds)
            hi = max(rd.src + rd.numel for rd in rds)
            arr = self.rank_array(snap, r, profile)
            try:
                raw = arr[lo:hi]
            except FileNotFoundError as e:
                raise StoreError(f"snapshot {snap.id}: object of rank {r} profile p{profile} is missing ({e})") from e
            except Exception as e:  # checksum mismatch, truncated object, decode error
                raise StoreError(
                    f"snapshot {snap.id}: object of rank {r} profile p{profile} [{lo}, {hi}) is unreadable or "
                    f"corrupt ({type(e).__name__}: {e})"
                ) from e
            vals = decode(np.asarray(raw), snap.dtype)
            if np.isnan(vals).any():  # a missing object reads as the NaN fill value: tell the two apart
                gone = missing_chunks(self.io, array_key(snap.id, r, profile), self.layout(snap).rank_numel(r),
                                      snap.dtype, int(snap.meta["max_object_bytes"]), lo, hi)
                if gone:
                    raise StoreError(f"snapshot {snap.id}: object(s) of rank {r} profile p{profile} missing: "
                                     f"{gone[:3]}; the snapshot is damaged (run dist-ema ls --verify)")
            nbytes += raw.nbytes
            for rd in rds:
                out[rd.dst : rd.dst + rd.numel] = vals[rd.src - lo : rd.src - lo + rd.numel]
        return nbytes

    def read_region(self, snap: Snapshot, profile: int, name: str, start: int, end: int) -> np.ndarray:
        """Elements [start, end) of the flattened parameter ``name`` as float32."""
        lay = self.layout(snap)
        idx = lay.fqn_index()
        if name not in idx:
            raise UnknownParameterError(name, snap.id, list(idx))
        reads = plan_region(self._index[snap.layout_id][idx[name]], start, end)
        out = np.empty(end - start, dtype=np.float32)
        self.read_reads(snap, profile, reads, out)
        return out

    def read(self, step: int | None, sigma_rel: float | None = None, name: str = "", *, gamma: float | None = None):
        """Full tensor (torch, float32, the parameter's shape) of one parameter of one snapshot."""
        import torch

        snap = self.snapshot(step)
        k = self.profile_index(snap, sigma_rel, gamma)
        params = self.params(snap)
        if name not in params:
            raise UnknownParameterError(name, snap.id, list(params))
        shape = params[name][0]
        n = int(np.prod(shape))
        return torch.from_numpy(self.read_region(snap, k, name, 0, n).reshape(shape))

    def read_buffers(self, snap: Snapshot) -> dict[str, np.ndarray]:
        """Buffers stored with a snapshot (``buffers="copy"``)."""
        import zarr

        out = {}
        for i, (name, shape, _dtype) in enumerate(snap.meta.get("buffers", [])):
            arr = zarr.open_array(self.io.zarr_store, path=buffer_key(snap.id, i), mode="r", zarr_format=3)
            out[name] = np.asarray(arr[...]).reshape(shape)
        return out

    def verify(self, snap: Snapshot) -> list[str]:
        """Read every object of a snapshot and check its checksum; return problems (empty = healthy)."""
        problems = []
        lay = self.layout(snap)
        for r in range(lay.world_size):
            n = lay.rank_numel(r)
            if n == 0:
                continue
            for k in range(len(snap.gammas)):
                try:
                    arr = self.rank_array(snap, r, k)
                    vals = np.asarray(arr[...])
                    if np.isnan(decode(vals, snap.dtype)).any():
                        gone = missing_chunks(self.io, array_key(snap.id, r, k), n, snap.dtype,
                                              int(snap.meta["max_object_bytes"]), 0, n)
                        if gone:
                            problems.append(f"{snap.id}: rank {r} profile p{k}: missing objects {gone[:3]}")
                except Exception as e:  # noqa: BLE001 - reported, not raised
                    problems.append(f"{snap.id}: rank {r} profile p{k}: {type(e).__name__}: {e}")
        return problems


class UnknownParameterError(KeyError):
    """A parameter name that a snapshot does not hold; the message names the closest ones.

    A ``KeyError`` (what a dict lookup raises), printed as a sentence rather than a quoted key.
    """

    def __init__(self, name: str, snap_id: str, names: list[str]) -> None:
        import difflib

        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        super().__init__(f"no parameter {name!r} in snapshot {snap_id}; {hint}it has {len(names)} parameters "
                         f"(store.params(snap) lists them, or dist-ema inspect STORE)")

    def __str__(self) -> str:
        return str(self.args[0])


def open_store(url: str, storage_options: dict | None = None) -> SnapshotStore:
    """Open a dist-ema snapshot store for reading (local path, file://, s3://, any fsspec URL)."""
    return SnapshotStore(url, storage_options)
