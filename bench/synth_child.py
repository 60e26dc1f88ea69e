"""One synthesis in a fresh process (clean peak RSS): ``python -m bench.synth_child '<json>'``.

Prints one JSON line: seconds, bytes read, peak RSS (VmHWM) and the RSS right before the work
started (imports, model), so the work's own footprint is ``peak - before``; CPU seconds of the
process; with ``"profile": true`` the cProfile top functions (own time) of the main thread and
of synthesis' reader thread.
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


def top_functions(prof, rows: int = 6) -> list[str]:
    """The functions with the most own time, as 'share% name (seconds)'."""
    import pstats

    st = pstats.Stats(prof)
    total = sum(v[2] for v in st.stats.values()) or 1.0
    items = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:rows]
    out = []
    for (fname, line, func), v in items:
        where = func if fname == "~" else f"{fname.rsplit('/', 1)[-1]}:{line}({func})"
        out.append(f"{100 * v[2] / total:.0f}% {where} {v[2]:.2f}s")
    return out


def profile_reader_threads() -> list:
    """Profile synthesis' reader threads too (cProfile sees one thread): a profiler per reader pool worker."""
    from concurrent.futures import ThreadPoolExecutor

    import dist_ema.synthesis as lib

    profs: list = []

    class Profiled(ThreadPoolExecutor):
        def __init__(self, *a, **k):
            def start() -> None:
                import cProfile

                p = cProfile.Profile()
                if "read" in k.get("thread_name_prefix", ""):  # the reader threads, not the output writer's
                    profs.append(p)
                p.enable()

            super().__init__(*a, initializer=start, **k)

    lib.ThreadPoolExecutor = Profiled
    return profs


def main(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(int(cfg.get("threads", 1)))
    if cfg["kind"] == "dist-ema":
        from dist_ema import synthesize

        readers = profile_reader_threads() if cfg.get("profile") else None
        if cfg.get("warmup"):  # a first synthesis in this process: lazy imports and caches out of the profile
            import shutil

            synthesize(cfg["store"], sigma_rels=cfg["sigma_rels"], out=cfg["out"] + "-warmup", format=cfg.get(
                "format", "zarr"), progress=False, storage_options=cfg.get("storage_options"))
            shutil.rmtree(cfg["out"] + "-warmup", ignore_errors=True)
        before = _rss_mib()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        prof = None
        if readers is not None:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        mods = set(sys.modules)
        t0 = time.perf_counter()
        r = synthesize(cfg["store"], sigma_rels=cfg["sigma_rels"], step=cfg.get("step"), out=cfg["out"],
                       format=cfg.get("format", "zarr"), progress=False, storage_options=cfg.get("storage_options"))
        wall = time.perf_counter() - t0
        imported = sorted({m.split(".")[0] for m in set(sys.modules) - mods})  # lazy imports of the first call
        top = None
        if prof is not None:
            prof.disable()
            top = {"main": top_functions(prof), "reader": top_functions(readers[-1]) if readers else [],
                   "run": "second synthesis in the process" if cfg.get("warmup") else "first synthesis in a fresh "
                   "process, as timed"}
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        peak = _rss_mib()
        warm = None
        if cfg.get("again"):  # a second synthesis in the same process: imports and caches warm
            import shutil

            t1 = time.perf_counter()
            synthesize(cfg["store"], sigma_rels=cfg["sigma_rels"], step=cfg.get("step"), out=cfg["out"] + "-again",
                       format=cfg.get("format", "zarr"), progress=False, storage_options=cfg.get("storage_options"))
            warm = time.perf_counter() - t1
            shutil.rmtree(cfg["out"] + "-again", ignore_errors=True)
        return {"again_seconds": warm, "imported": imported, "user_s": ru1.ru_utime - ru0.ru_utime,
                "sys_s": ru1.ru_stime - ru0.ru_stime,
                "seconds": wall, "lib_seconds": r.seconds, "bytes_read": r.bytes_read, "peak_rss_mib": peak,
                "lib_peak_rss_mib": r.peak_rss_mib[0], "rss_before_mib": before, "snapshots": len(r.snapshots),
                "error": r.targets[0]["error"], "profile": top}
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
        return {"seconds": wall, "peak_rss_mib": _rss_mib(), "rss_before_mib": before}
    raise ValueError(cfg["kind"])


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
