"""One synthesis in a fresh process (clean peak RSS): ``python -m bench.synth_child '<json>'``.

Prints one JSON line: seconds, bytes read, peak RSS (ru_maxrss) and the RSS right before the
work started (imports, model), so the work's own footprint is ``peak - before``.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def _rss_mib() -> float:
    """Peak RSS of this process (VmHWM; see dist_ema.synthesis._peak_rss_mib)."""
    from dist_ema.synthesis import _peak_rss_mib

    return _peak_rss_mib()


def _digest(url: str) -> str:
    import hashlib

    from dist_ema import open_store

    st = open_store(url)
    snap = st.snapshot()
    h = hashlib.sha256()
    for name in sorted(st.params(snap)):
        h.update(st.read(snap.step, gamma=snap.gammas[0], name=name).numpy().tobytes())
    return h.hexdigest()[:16]


def _count_fetches() -> dict:
    """Count the bytes of snapshot data objects fetched from a local store (instrumentation only)."""
    import zarr.storage as zs

    stats = {"bytes": 0, "gets": 0}
    orig = zs.LocalStore.get

    async def get(self, key, prototype, byte_range=None):
        buf = await orig(self, key, prototype, byte_range)
        if buf is not None and key.startswith("snapshots/") and "/c/" in key:
            stats["bytes"] += len(buf)
            stats["gets"] += 1
        return buf

    zs.LocalStore.get = get
    return stats


def _top(prof, rows: int = 6) -> list[str]:
    """The functions with the most own time (main thread), as 'share% name'."""
    import pstats

    st = pstats.Stats(prof)
    total = sum(v[2] for v in st.stats.values()) or 1.0
    items = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:rows]
    out = []
    for (fname, line, func), v in items:
        where = func if fname == "~" else f"{fname.rsplit('/', 2)[-1]}:{line}({func})"
        out.append(f"{100 * v[2] / total:.0f}% {where}")
    return out


def main(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(int(cfg.get("threads", 1)))
    if cfg["kind"] == "dist-ema":
        from dist_ema import synthesize

        fetched = _count_fetches() if cfg.get("count_fetch") else None
        if cfg.get("proposed"):
            import dist_ema.synthesis as lib
            from bench.proposed import map_units

            lib._map_units = map_units
        before = _rss_mib()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        prof = None
        if cfg.get("profile"):
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        extra = {"unit_bytes": int(cfg["unit_bytes"])} if cfg.get("unit_bytes") else {}  # else: library default
        r = synthesize(cfg["store"], sigma_rels=cfg["sigma_rels"], step=cfg.get("step"), out=cfg["out"],
                       format=cfg.get("format", "zarr"), progress=False, **extra)
        top = None
        if prof is not None:
            prof.disable()
            top = _top(prof)
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = {"user_s": ru1.ru_utime - ru0.ru_utime, "sys_s": ru1.ru_stime - ru0.ru_stime,
               "minor_faults": ru1.ru_minflt - ru0.ru_minflt}
        return {**cpu, "seconds": r.seconds, "wall": wall, "bytes_read": r.bytes_read, "peak_rss_mib": _rss_mib(),
                "lib_peak_rss_mib": r.peak_rss_mib[0], "rss_before_mib": before, "snapshots": len(r.snapshots),
                "error": r.targets[0]["error"], "bytes_fetched": fetched["bytes"] if fetched else None,
                "digest": _digest(cfg["out"]) if cfg.get("digest") else None, "profile": top}
    if cfg["kind"] == "ema-pytorch":
        import ema_pytorch

        from bench.models import Bag

        model = Bag(cfg["numel"], tensors=8)
        ema = ema_pytorch.PostHocEMA(model, sigma_rels=tuple(cfg["tracked"]), update_every=1,
                                     checkpoint_every_num_steps="manual", checkpoint_folder=cfg["folder"],
                                     checkpoint_dtype=torch.float32)
        before = _rss_mib()
        t0 = time.perf_counter()
        synth = ema.synthesize_ema_model(sigma_rel=cfg["sigma_rels"][0])
        wall = time.perf_counter() - t0
        del synth
        return {"seconds": wall, "wall": wall, "peak_rss_mib": _rss_mib(), "rss_before_mib": before}
    raise ValueError(cfg["kind"])


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
