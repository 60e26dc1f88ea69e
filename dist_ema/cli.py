"""The ``dist-ema`` command.

    dist-ema error --sigma-rels 0.05 0.10 --snapshot-every 1000 --steps 100000 --targets 0.05 0.1 0.15
    dist-ema synthesize runs/exp1/snapshots --sigma-rels 0.1 0.15 --out runs/exp1/synth

Flags are spelled as in the config file and the training script (``--sigma-rels``,
``--snapshot-every``, ``--steps``); the older ``--tracked`` and ``--sigma-rel`` are aliases.

Each subcommand lives in one function ``_cmd_<name>(args) -> int``; the parser is built
in :func:`build_parser`. The CLI (not the library) configures logging.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

import numpy as np

from dist_ema import phema
from dist_ema.errors import ConfigError, DistEMAError

__all__ = ["build_parser", "main"]

log = logging.getLogger("dist_ema")
MAX_SCHEDULE = 10_000_000  # snapshots a schedule of `dist-ema error` may have (its arrays: ~0.5 GB per profile)


def schedule_profiles(tracked: Sequence[float], snapshot_every: float, steps: float) -> tuple[np.ndarray, np.ndarray]:
    """Snapshot (t, gamma) pairs of a planned run: every tracked profile at every interval.

    Snapshots at snapshot_every, 2*snapshot_every, ..., and always one at ``steps``.
    """
    if snapshot_every <= 0 or steps <= 0:
        raise ConfigError(f"--snapshot-every and --steps must be > 0; got {snapshot_every} and {steps}")
    if snapshot_every > steps:
        raise ConfigError(f"--snapshot-every ({snapshot_every:g}) is larger than --steps ({steps:g})")
    if steps / snapshot_every > MAX_SCHEDULE:
        raise ConfigError(f"the schedule has {steps / snapshot_every:,.0f} snapshots; dist-ema error evaluates up to "
                          f"{MAX_SCHEDULE:,}: raise --snapshot-every (synthesis uses at most "
                          f"{phema.MAX_ROWS // 2} snapshots of 2 profiles per target anyway)")
    times = np.arange(1, int(steps // snapshot_every) + 1, dtype=np.float64) * snapshot_every
    if times[-1] < steps:
        times = np.append(times, float(steps))
    gammas = np.atleast_1d(phema.sigma_rel_to_gamma(np.asarray(tracked, dtype=np.float64)))
    t = np.repeat(times, gammas.size)
    g = np.tile(gammas, times.size)
    return t, g


def _format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


DEFAULT_TARGETS = (0.03, 0.05, 0.07, 0.10, 0.15, 0.20, 0.25)  # dist-ema error's target sigma_rels


def _cmd_error(args: argparse.Namespace) -> int:
    from dist_ema.config import load_config

    cfg = load_config(args.config)  # None: the defaults
    if args.sigma_rels is None:
        args.sigma_rels = list(cfg.sigma_rels)
    args.tracked = args.sigma_rels
    if args.snapshot_every is None:
        args.snapshot_every = float(cfg.snapshot_every * cfg.update_every) if cfg.snapshot_every else 1000.0
    t, g = schedule_profiles(args.tracked, args.snapshot_every, args.steps)
    target_t = float(args.t) if args.t is not None else float(t.max())
    betas = list(args.target_betas or [])
    beta_t = float(args.beta_t) if args.beta_t is not None else target_t
    from_beta = [float(x) for x in np.atleast_1d(phema.beta_to_sigma_rel(betas, beta_t))] if betas else []
    targets = np.asarray(([] if betas and args.targets is None else list(args.targets or DEFAULT_TARGETS))
                         + from_beta, dtype=np.float64)
    beta_of = dict(zip(from_beta, betas))
    target_g = np.atleast_1d(phema.sigma_rel_to_gamma(targets))
    sol = phema.solve_coefficients(t, g, np.full(targets.size, target_t), target_g)
    n_snap = int(np.unique(t[t <= target_t]).size)  # snapshots of the schedule at or before the target
    n_used = int(np.unique(t[sol.used[:, 0]]).size)  # those the solve used (a subset above phema.MAX_ROWS rows)
    if args.json:
        print(json.dumps({
            "tracked_sigma_rels": list(args.tracked), "snapshot_every": args.snapshot_every,
            "steps": args.steps, "t": target_t, "snapshots": n_snap, "snapshots_used": int(sol.used[:, 0].sum()),
            "subset": bool(sol.subset[0]),
            "targets": [
                {"sigma_rel": float(s), "gamma": float(gg), "error": float(e), "condition": float(c),
                 **({"beta": beta_of[float(s)], "beta_t": beta_t} if float(s) in beta_of else {})}
                for s, gg, e, c in zip(targets, target_g, sol.error, sol.condition)
            ],
        }, indent=2))
    else:
        print(
            f"schedule: tracked sigma_rel {', '.join(f'{s:g}' for s in args.tracked)}; snapshot every "
            f"{args.snapshot_every:g} of {args.steps:g} steps ({n_snap} snapshots); target t = {target_t:g}"
        )
        if sol.subset[0]:
            print(f"solved over a subset of {n_used} of the {n_snap} snapshots (at most {phema.MAX_ROWS} rows per "
                  f"solve: spread over the run and dense near the target, as synthesis does); the errors are "
                  f"those of the subset's coefficients")
        if betas:
            print(f"classic EMA betas at t = {beta_t:g}: sigma_rel = sqrt(beta) / ((1 - beta) t) "
                  f"(dist_ema.phema.beta_to_sigma_rel)")
        rows = [
            [f"{s:.4f}", f"{gg:.3f}", f"{100 * e:.3f}%", f"{c:.3g}"]
            + ([f"{beta_of[float(s)]:g}" if float(s) in beta_of else ""] if betas else [])
            for s, gg, e, c in zip(targets, target_g, sol.error, sol.condition)
        ]
        print(_format_table(["sigma_rel", "gamma", "rel. error", "condition"] + (["beta"] if betas else []), rows))
    if args.plot:
        _plot_profiles(args.plot, t, g, sol, target_t, targets, target_g)
        print(f"wrote {args.plot}")
    return 0


def _plot_profiles(path: str, t, g, sol: phema.Solution, target_t: float, targets, target_g) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(
            "dist-ema error --plot needs matplotlib: pip install 'dist-ema[plot]' (or pip install matplotlib)"
        ) from e
    tau = np.linspace(0.0, target_t, 2001)
    fig, ax = plt.subplots(figsize=(7, 4))
    for j, (s, gg) in enumerate(zip(targets, target_g)):
        (line,) = ax.plot(tau, phema.profile(target_t, gg, tau), lw=2, label=f"target sigma_rel={s:g}")
        rec = phema.reconstructed_profile(sol.coefficients[:, j], t, g, tau)
        ax.plot(tau, rec, "--", color=line.get_color(), label=f"reconstructed ({100 * sol.error[j]:.2f}% error)")
    ax.set_xlabel("t (training time)")
    ax.set_ylabel("profile p(tau)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _storage_options(args: argparse.Namespace) -> dict | None:
    if not getattr(args, "storage_options", None):
        return None
    try:
        opts = json.loads(args.storage_options)
    except ValueError as e:
        raise ConfigError(
            f"--storage-options must be a JSON object, e.g. '{{\"endpoint_url\": \"http://...\"}}': {e}"
        ) from None
    if not isinstance(opts, dict):
        raise ConfigError("--storage-options must be a JSON object")
    return opts


def _store_url(args: argparse.Namespace) -> tuple[str, dict | None]:
    """The store URL and storage options: the arguments, else the [dist_ema] table of --config."""
    from dist_ema.config import load_config

    cfg = load_config(args.config) if getattr(args, "config", None) else None
    url = args.store or (cfg.store if cfg is not None else None)
    if not url:
        raise ConfigError("no store: give the store URL, or --config FILE.toml with a [dist_ema] store")
    opts = _storage_options(args)
    if opts is None and cfg is not None:
        opts = cfg.storage_options
    return url, opts


def _open_store(args: argparse.Namespace):
    """open_store with errors that say what the path is when it is not a store (one line each)."""
    import os

    from dist_ema.store import open_store
    from dist_ema.store.fs import StoreError, StoreIO, StoreUnreachableError
    from dist_ema.store.layout import STORE_MARKER

    url, opts = _store_url(args)
    local = "://" not in url or url.startswith("file://")
    path = url[len("file://"):] if url.startswith("file://") else url
    if local and os.path.isfile(path):
        hint = ""
        synth = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        if path.endswith(".safetensors") and os.path.isfile(os.path.join(synth, "zarr", STORE_MARKER)):
            store = os.path.join(synth, "zarr")
            hint = f"; it was written by a synthesis whose store is {store}: dist-ema {args.command} {store}"
        raise ConfigError(f"{url} is a file, not a dist-ema store (a folder holding {STORE_MARKER}); give the "
                          f"store's folder{hint}")
    try:
        return open_store(url, opts)
    except StoreUnreachableError:
        raise  # nothing to look for there
    except StoreError:
        from dist_ema.synthesis import MARKER  # imports torch: only when needed

        io = StoreIO(url, opts)
        if io.exists(f"zarr/{STORE_MARKER}"):  # a safetensors synthesis output: its store is one level down
            store = f"{url.rstrip('/')}/zarr"
            raise StoreError(f"{url} is a synthesis output, not a snapshot store; the synthesized store is "
                             f"{store}: dist-ema {args.command} {store}") from None
        if io.exists(MARKER):
            raise StoreError(f"{url} holds a synthesis output that is not complete (a failed or running job; "
                             f"{MARKER} is there but no store yet); rerun the synthesis") from None
        raise


def _cmd_ls(args: argparse.Namespace) -> int:
    store = _open_store(args)
    snaps, torn = store.listing()  # one listing: every marker read once
    found = _verify_all(store, snaps) if args.verify else [[] for _ in snaps]
    rows = []
    problems: list[str] = []
    for s, p in zip(snaps, found):
        problems += p
        status = "ok" if not p else f"{len(p)} problem(s)"
        engine = s.meta.get("engine", "?")
        rows.append([s.id, str(s.step), f"{s.t:g} {s.unit}", ",".join(f"{x:g}" for x in s.sigma_rels), s.dtype,
                     str(s.world_size), _ENGINE_NAMES.get(engine, engine), *([status] if args.verify else [])])
    headers = ["snapshot", "step", "t", "sigma_rels", "dtype", "ranks", "engine", *(["verify"] if args.verify else [])]
    if rows:
        print(_format_table(headers, rows))
    extra = f"; {len(torn)} uncommitted (ignored)" if torn else ""
    print(f"{len(snaps)} committed snapshot(s) in {store.url}{extra}")
    for folder, record, gone in store.retirements():  # abandoned trajectories: kept, never synthesized
        print(f"retired: steps {[s.step for s in gone]} in {folder}/ (the EMA was restored to step "
              f"{record.get('restored_step')}; kept, never used by synthesis)")
    for folder in store.unfinished_retirements():
        print(f"retired: {folder}/ is an interrupted retirement (no record; kept as it is)")
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


def _verify_all(store, snaps: list) -> list[list[str]]:
    """Each snapshot's problems (:meth:`SnapshotStore.verify`), in order.

    Snapshots whose rank arrays are each one read (at most ``store.read_bytes``) are verified
    ``store.prefetch`` at a time (on object stores the requests of many small snapshots overlap);
    larger ones one by one, each with its reads in flight. Either way at most ``prefetch`` reads
    of at most ``read_bytes`` are held at once.
    """
    from concurrent.futures import ThreadPoolExecutor

    from dist_ema.store.format import STORAGE_DTYPES

    small = True
    for s in snaps:  # the layouts (one read per distinct layout) before any thread starts
        lay = store.layout(s)
        widest = max((lay.rank_numel(r) for r in range(lay.world_size)), default=0)
        small = small and widest * STORAGE_DTYPES.get(s.dtype, 4) <= store.read_bytes
    workers = min(store.prefetch, len(snaps)) if small else 1
    if workers < 2:
        return [store.verify(s) for s in snaps]
    _ = store.ranges  # made once here, not by two threads at once
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dist-ema-verify") as pool:
        return list(pool.map(store.verify, snaps))


# engine names as stored -> as shown: "replicated" is DDP or a plain module (each rank averages 1/world)
_ENGINE_NAMES = {"replicated": "ddp/plain"}


def _cmd_inspect(args: argparse.Namespace) -> int:
    store = _open_store(args)
    snap = store.snapshot(args.step)
    lay = store.layout(snap)
    meta = {k: v for k, v in snap.meta.items() if k not in ("coefficients", "rows")}
    if args.json:
        print(json.dumps({"meta": meta, "params": [[f, list(sh), d] for f, sh, d in lay.params]}, indent=1))
        return 0
    for k in ("step", "t", "unit", "dtype", "world_size", "engine", "layout", "model", "update_every", "version"):
        if k in meta:
            value = meta[k]
            if k == "engine" and value in _ENGINE_NAMES:
                value = f"{_ENGINE_NAMES[value]} (stored as {value!r}: each rank averages 1/world of every parameter)"
            print(f"{k:>13}: {value}")
    for p in snap.meta["profiles"]:
        extra = f"  error {100 * p['error']:.3f}%" if "error" in p else ""
        print(f"      profile: {p['array']} sigma_rel {p['sigma_rel']:.4f} gamma {p['gamma']:.3f}{extra}")
    total = lay.total_numel
    print(f"   parameters: {len(lay.params)} tensors, {total:,} elements")
    for f, sh, d in lay.params[: args.max_params]:
        print(f"      {f}  {list(sh)}  {d}")
    if len(lay.params) > args.max_params:
        print(f"      ... {len(lay.params) - args.max_params} more (--max-params)")
    return 0


def _cmd_synthesize(args: argparse.Namespace) -> int:
    import os

    from dist_ema.synthesis import HIGH_ERROR, high_error_warnings, synthesize

    url, opts = _store_url(args)
    res = synthesize(
        url, sigma_rels=args.sigma_rels, t=args.t, step=args.step, out=args.out, format=args.format,
        dtype=args.dtype, storage_options=opts, overwrite=args.overwrite,
        progress=not args.no_progress, prefetch=args.prefetch,
        read_bytes=None if args.read_mib is None else int(args.read_mib * 2**20),
        **_adapter_args(args),
    )
    # synthesize() has left the process group by now: the launcher's RANK says who prints
    if int(os.environ.get("RANK", "0")) == 0:
        rows = [[f"{x['sigma_rel']:.4f}", f"{x['gamma']:.3f}", f"{x['t']:g}", f"{100 * x['error']:.3f}%",
                 "HIGH (see below)" if x["error"] > HIGH_ERROR else ""] for x in res.targets]
        print(_format_table(["sigma_rel", "gamma", "t", "rel. error", "note"], rows))
        # the summary line (bytes, time, output) is synthesize()'s own INFO log line: not printed twice
        for line in high_error_warnings(res.targets):
            print(f"WARNING: {line}")
    return 0


def _adapter_args(args: argparse.Namespace) -> dict:
    """``adapter_config=`` for synthesize from ``--adapter-config`` (a JSON file, or a folder holding one)."""
    if args.adapter_config is None:
        return {}
    import json
    import os

    from dist_ema.errors import ConfigError

    if args.format != "peft":
        raise ConfigError("--adapter-config is for --format peft only")
    path = args.adapter_config
    if os.path.isdir(path):
        path = os.path.join(path, "adapter_config.json")
    try:
        with open(path) as f:
            return {"adapter_config": json.load(f)}
    except (OSError, ValueError) as e:
        raise ConfigError(f"--adapter-config {args.adapter_config}: cannot read a JSON adapter config "
                          f"({type(e).__name__}: {e})") from None


def _cmd_import(args: argparse.Namespace) -> int:
    from dist_ema.importers import import_run
    from dist_ema.importers.libraries import is_edm2

    edm2 = is_edm2(args.kind)
    if args.sigma_rels is None and not edm2:
        raise ConfigError(f"--sigma-rels is required for {args.kind}: name the run's profiles in the library's order "
                          f"(its files do not record them), e.g. --sigma-rels 0.05 0.10")
    res = import_run(args.kind, args.src, args.store_url, sigma_rels=args.sigma_rels, update_every=args.update_every,
                     update_after_step=args.update_after_step, step_size_correction=args.step_size_correction,
                     storage_dtype=args.storage_dtype, average_buffers=args.average_buffers,
                     storage_options=_storage_options(args), allow_pickle=args.allow_pickle,
                     edm2_code=args.edm2_code)
    if res.kind == "edm2":
        print(f"imported {len(res.steps)} snapshot(s) of edm2 into {res.url}: kimg {res.steps[0]}..{res.steps[-1]}, "
              f"t {res.t[0]:.0f}..{res.t[-1]:.0f} samples (nimg), sigma_rels "
              f"{' '.join(f'{s:g}' for s in res.sigma_rels)} (from the file names)"
              + (f"; left out {len(res.left_out)} file(s) at nimg 0" if res.left_out else ""))
    else:
        print(f"imported {len(res.steps)} snapshot(s) of {res.kind} into {res.url}: steps {res.steps[0]}.."
              f"{res.steps[-1]}, t {res.t[0]:g}..{res.t[-1]:g} steps, sigma_rels "
              f"{' '.join(f'{s:g}' for s in res.sigma_rels)}, update_every {res.update_every}"
              + ("" if res.exact else " (NOT the nominal profiles: see the warning)"))
    rows = [[f"{c.sigma_rel:.4f}", f"{100 * c.error:.3f}%",
             "-" if c.applied_error is None else f"{100 * c.applied_error:.3f}%",
             "-" if c.library_error is None else f"{100 * c.library_error:.3f}%"] for c in res.targets]
    if res.kind == "edm2":
        print(f"reconstruction error at kimg {res.steps[-1]} (t = {res.t[-1]:.0f} samples):")
        print(_format_table(["sigma_rel", "synthesis"], [r[:2] for r in rows]))
        return 0
    print(f"reconstruction error at step {res.steps[-1]} (t = {res.t[-1]:g}):")
    print(_format_table(["sigma_rel", "synthesis", "as applied", f"{res.kind}'s own"], rows))
    return 0


def _error_prefix(command: str | None) -> str:
    """``dist-ema ls: error:``; for the ``error`` command ``dist-ema error:`` (not ``error: error:``)."""
    if not command:
        return "dist-ema: error:"
    return "dist-ema error:" if command == "error" else f"dist-ema {command}: error:"


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error prefix (see :func:`_error_prefix`)."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        command = self.prog.split(" ", 1)[1] if " " in self.prog else None
        self.exit(2, f"{_error_prefix(command)} {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from dist_ema import __version__
    from dist_ema.config import flag_of  # the settings' flags are spelled as in every script

    p = _Parser(prog="dist-ema", description="Post-hoc EMA for sharded training.")
    p.add_argument("--version", action="version", version=f"dist-ema {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    # -v after the subcommand too; SUPPRESS: a subcommand that was not given -v keeps the top-level value
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log at DEBUG level")

    e = sub.add_parser(
        "error", parents=[verbose],
        help="reconstruction error of target profiles for a planned snapshot schedule",
        description="Choose tracked profiles and a snapshot interval before training: prints the "
        "relative L2 error and condition number of each target profile's reconstruction.",
    )
    e.add_argument(flag_of("sigma_rels"), "--tracked", dest="sigma_rels", type=float, nargs="+", default=None,
                   metavar="SIGMA_REL", help="sigma_rel of each tracked profile, as in training (default: "
                   "--config's sigma_rels, else 0.05 0.10; --tracked is an alias)")
    e.add_argument("--snapshot-every", type=float, default=None,
                   help="snapshot interval in steps (default: --config's snapshot_every x update_every, else 1000)")
    e.add_argument("--config", metavar="FILE.toml", help="dist-ema config file: tracked profiles and interval")
    e.add_argument("--steps", type=float, default=100_000, help="training length in steps (default 100000)")
    e.add_argument("--targets", type=float, nargs="+", default=None,
                   metavar="SIGMA_REL", help="target sigma_rels to evaluate (default 0.03 0.05 0.07 0.1 0.15 0.2 "
                   "0.25, unless --target-betas is given)")
    e.add_argument("--target-betas", type=float, nargs="+", default=None, metavar="BETA",
                   help="targets given as the constant beta of a classic EMA (one update per step), converted "
                   "at --beta-t: sigma_rel = sqrt(beta) / ((1 - beta) t)")
    e.add_argument("--beta-t", type=float, default=None, metavar="T",
                   help="the time (steps) at which --target-betas are converted (default: the target time)")
    e.add_argument("--t", type=float, default=None, help="target time (default: end of training)")
    e.add_argument("--plot", metavar="FILE.png", help="draw target vs reconstructed profiles (needs matplotlib)")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.set_defaults(func=_cmd_error)

    def store_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("store", nargs="?", default=None,
                        help="snapshot store URL: local path, file://, s3://bucket/prefix, ... "
                             "(default: the store of --config)")
        sp.add_argument(flag_of("storage_options"), metavar="JSON",
                        help="fsspec options as JSON (default: --config's, else the environment, e.g. AWS_*, "
                             "FSSPEC_S3_*)")
        sp.add_argument("--config", metavar="FILE.toml",
                        help="dist-ema config file: its [dist_ema] store and storage_options are the defaults")

    ls = sub.add_parser("ls", parents=[verbose], help="list committed snapshots of a store")
    store_args(ls)
    ls.add_argument("--verify", action="store_true", help="read every object and check its checksum")
    ls.set_defaults(func=_cmd_ls)

    ins = sub.add_parser("inspect", parents=[verbose], help="show one snapshot's metadata and parameters")
    store_args(ins)
    ins.add_argument("--step", type=int, default=None, help="snapshot step (default: newest)")
    ins.add_argument("--max-params", type=int, default=20, help="parameters to list (default 20)")
    ins.add_argument("--json", action="store_true", help="print JSON")
    ins.set_defaults(func=_cmd_inspect)

    sy = sub.add_parser("synthesize", parents=[verbose],
                        help="synthesize the EMA for new sigma_rels (also under torchrun)")
    store_args(sy)
    sy.add_argument("--sigma-rels", "--sigma-rel", dest="sigma_rels", type=float, nargs="+", required=True,
                    metavar="SIGMA_REL", help="target sigma_rel(s), each in (0, 0.2887) (--sigma-rel is an alias)")
    when = sy.add_mutually_exclusive_group()
    when.add_argument("--t", type=float, default=None, help="target time (default: the newest snapshot's)")
    when.add_argument("--step", type=int, default=None, help="target the time of the snapshot at this step")
    sy.add_argument("--out", required=True, help="output directory (safetensors) or store URL (zarr)")
    sy.add_argument("--format", choices=["safetensors", "zarr", "peft"], default="safetensors",
                    help="safetensors (default): a Zarr store under <out>/zarr and one safetensors file per "
                    "target in <out>/sigma_rel-<s>/; zarr: the Zarr store at --out only; peft: like safetensors, "
                    "each target folder a PEFT adapter (adapter_model.safetensors, adapter_config.json)")
    sy.add_argument("--adapter-config", default=None, metavar="JSON",
                    help="--format peft: the adapter's adapter_config.json (or its folder), for snapshots of a "
                    "model that was not a PeftModel when it was tracked (default: the config the snapshots record)")
    sy.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="dtype of the synthesized weights (default float32; accumulation is float64 either way)")
    sy.add_argument("--prefetch", type=int, default=None, metavar="N",
                    help="ranged reads in flight per rank (default: 8 on object stores, 1 on local disk)")
    sy.add_argument("--read-mib", type=float, default=None, metavar="MIB",
                    help="the largest ranged read, in MiB (default: 16 on object stores, 4 on local disk; at "
                    "least one compute block, 1 MiB); a rank holds about (prefetch + 8) x this in read buffers")
    sy.add_argument("--overwrite", action="store_true", help="replace an existing output")
    sy.add_argument("--no-progress", action="store_true", help="no progress bar")
    sy.set_defaults(func=_cmd_synthesize)
    p.subcommands = {"error": e, "ls": ls, "inspect": ins, "synthesize": sy}  # type: ignore[attr-defined]

    im = sub.add_parser("import", parents=[verbose],
                        help="turn a checkpoint folder of ema-pytorch, nitrous-ema, pytorch-posthoc-ema or EDM2 into "
                        "a store",
                        description="Write the EMA files of a single-GPU post-hoc EMA library's run "
                        "(<profile>.<step>.pt; EDM2: network-snapshot-<kimg>-<std>.pkl, with --allow-pickle) as a "
                        "dist-ema store that ls, synthesize and load_synthesized use like any other.")
    im.add_argument("kind", help="the library that wrote SRC: ema-pytorch, nitrous-ema, posthoc-ema or edm2")
    im.add_argument("src", help="the checkpoint folder the library wrote (edm2: the run folder)")
    im.add_argument("store_url", metavar="store", help="the new store's URL (local path, s3://..., ...); no snapshots")
    im.add_argument("--sigma-rels", dest="sigma_rels", type=float, nargs="+", default=None, metavar="SIGMA_REL",
                    help="the run's profiles, in the library's order (the files do not record them); edm2: not "
                    "needed (the file names give the stds), checked against the names if given")
    im.add_argument("--allow-pickle", action="store_true",
                    help="edm2: load EDM2's pickles, which runs the code they hold, in a child process (only for "
                    "files you trust); without it they are refused")
    im.add_argument("--edm2-code", default=None, metavar="PATH",
                    help="edm2: the folder of EDM2's code (holding dnnlib/ and torch_utils/), put on the child "
                    "process's Python path (default: nothing added)")
    im.add_argument("--update-every", type=int, default=None, metavar="K",
                    help="the run's update_every (default: the library's, 100 for ema-pytorch and nitrous-ema, 10 "
                    "for posthoc-ema); above 1 the files do not hold the nominal profiles (warned)")
    im.add_argument("--update-after-step", type=int, default=None, metavar="N",
                    help="posthoc-ema's update_after_step (default: read from the files)")
    im.add_argument("--step-size-correction", action="store_true",
                    help="nitrous-ema's KarrasEMA ran with step_size_correction=True")
    im.add_argument("--storage-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="dtype of the stored snapshots (default float32)")
    im.add_argument("--average-buffers", action="store_true",
                    help="store norm layers' running statistics as averaged tensors (synthesized like weights) "
                    "instead of snapshot buffers")
    im.add_argument(flag_of("storage_options"), metavar="JSON", help="fsspec options of the store as JSON")
    im.set_defaults(func=_cmd_import)
    p.subcommands["import"] = im  # type: ignore[attr-defined]
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from dist_ema.config import unknown_flags_message

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse leaves a subcommand's typos to the top level: report them with that subcommand
        sub = parser.subcommands[args.command]  # type: ignore[attr-defined]
        sub.error(unknown_flags_message(sub, unknown))
    # dist-ema's own lines at INFO (DEBUG with -v); other libraries' only from WARNING (e.g. not
    # botocore's "Found credentials in environment variables")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from dist_ema.store.fs import UNREACHABLE, classify, unreachable_message

    prefix = _error_prefix(args.command)
    try:
        return int(args.func(args) or 0)
    except (DistEMAError, ValueError, FileExistsError, KeyError) as e:
        print(f"{prefix} {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if classify(e) == UNREACHABLE:  # e.g. from a zarr read, below dist-ema's retries
            print(f"{prefix} {unreachable_message(e, args.command)}", file=sys.stderr)
            return 2
        if isinstance(e, OSError):  # a path that is not what it should be (a file for a folder, no permission)
            print(f"{prefix} {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
