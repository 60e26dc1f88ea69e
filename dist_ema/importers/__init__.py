"""Import runs of the single-GPU post-hoc EMA libraries into a dist-ema store.

    dist_ema.import_run("ema-pytorch", "./post-hoc-ema-checkpoints", "runs/old/snapshots",
                        sigma_rels=(0.05, 0.10), update_every=1)
    dist-ema import ema-pytorch ./post-hoc-ema-checkpoints runs/old/snapshots --sigma-rels 0.05 0.10 --update-every 1

ema-pytorch (``ema_pytorch.PostHocEMA``), nitrous-ema and pytorch-posthoc-ema write one file per
tracked profile every ``checkpoint_every`` steps, ``<profile index>.<step>.pt``. EDM2 writes pickles,
``network-snapshot-<kimg>-<std>.pkl``, whose loading runs code: imported only with ``allow_pickle=True``
(``--allow-pickle``), and unpickled only in a child process (edm2.py). The result is a
store like one written by training (format 2, commit markers, checksums): ``dist-ema ls``,
``dist-ema synthesize``, :func:`dist_ema.synthesize` and :func:`dist_ema.load_synthesized` use it
as any other.

Phases: **scan** the folder's file names (plan.py, pure), **probe** the first step's files for
what they hold (io.py), **plan** every step's time and what the library actually applied
(plan.py, profiles.py, pure), **write** the snapshots file by file, then commit them all
(io.py). Conventions per library: libraries.py.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from dist_ema.errors import ConfigError
from dist_ema.importers.libraries import LIBRARIES, Library, is_edm2, resolve_kind
from dist_ema.importers.plan import ImportPlan, TargetCheck, plan_import, scan_names

__all__ = ["KINDS", "ImportResult", "TargetCheck", "import_run"]

log = logging.getLogger("dist_ema")

KINDS = (*LIBRARIES, "edm2")


@dataclass(frozen=True)
class ImportResult:
    """What an import wrote (see :func:`import_run`)."""

    url: str
    kind: str
    steps: tuple[int, ...]  # the snapshots' steps (the library's step count, from the file names)
    t: tuple[float, ...]  # their times (see ImportPlan.time_rule)
    repeated: tuple[int, ...]  # steps left out: the EMA had not moved since the previous file
    sigma_rels: tuple[float, ...]
    update_every: int
    update_after_step: int
    exact: bool  # the files hold the nominal profiles (update_every == 1)
    targets: tuple[TargetCheck, ...]  # reconstruction errors at the newest snapshot
    warnings: tuple[str, ...]
    buffers: tuple[str, ...]  # entries stored as snapshot buffers (not averaged)
    bytes_written: int
    seconds: float
    unit: str = "steps"  # the unit of t: "samples" for EDM2 (t = nimg)
    left_out: tuple[str, ...] = ()  # files not imported (EDM2: the snapshots at nimg 0)


def import_run(kind: str, src: str, store: str, sigma_rels: Sequence[float] | None = None,
               update_every: int | None = None, *, update_after_step: int | None = None,
               step_size_correction: bool = False, storage_dtype: str = "float32", average_buffers: bool = False,
               storage_options: dict | None = None, allow_pickle: bool = False,
               edm2_code: str | None = None) -> ImportResult:
    """Turn a library's checkpoint folder into a dist-ema store at ``store`` (new, or without snapshots).

    Args:
        kind: "ema-pytorch", "nitrous-ema", "posthoc-ema" (pytorch-posthoc-ema) or "edm2" (EDM2's run folder,
            ``network-snapshot-<kimg>-<std>.pkl``; needs ``allow_pickle=True``).
        src: the folder the library wrote (local).
        store: the store URL (local path, ``s3://...``, any fsspec URL); it must hold no snapshot.
        sigma_rels: the run's profiles, in the library's order (its ``sigma_rels``); the files do not record
            them, so the number of profile indices in the file names must match. edm2: not needed (the file
            names give the stds); if given, they must be the names' stds.
        update_every: the run's update_every (default: the library's default, which a run that did not set it
            used: ema-pytorch and nitrous-ema 100, pytorch-posthoc-ema 10). With more than 1 the files do not
            hold the nominal profiles (one-step beta): they are imported as the nominal ones, with a warning
            that gives the error this causes, and each snapshot's metadata records what was applied.
        update_after_step: pytorch-posthoc-ema's (the first step with an EMA update; default: read from the
            files, else the library's 100).
        step_size_correction: nitrous-ema's KarrasEMA option of that name.
        storage_dtype: "float32" (default; exact for float32/float16/bfloat16 files), "bfloat16", "float16".
        average_buffers: store norm layers' running statistics as averaged tensors (synthesized like the
            weights, as the libraries' own synthesis does) instead of as snapshot buffers (copied from the
            smallest sigma_rel's file; what ``load_synthesized`` writes back into a model's buffers).
        storage_options: fsspec options of the store.
        allow_pickle: edm2 only: load EDM2's pickles, which runs the code they hold, in a child process
            (``python -m dist_ema.importers.edm2_child``); without it EDM2's files are refused. Only for files
            you trust.
        edm2_code: edm2 only: the folder of EDM2's code (holding ``dnnlib/`` and ``torch_utils/``), put first
            on the child's ``sys.path`` (default: nothing added).

    Returns the snapshots written; raises ConfigError (bad arguments or source folder) or StoreError (the
    store) before anything is committed.

    Example:
        >>> res = import_run("posthoc-ema", "ckpts", "runs/ph/snapshots", sigma_rels=(0.05, 0.28),
        ...                  update_every=1, update_after_step=1)
        >>> dist_ema.synthesize("runs/ph/snapshots", sigma_rels=[0.15], out="runs/ph/synth")
    """
    from dist_ema.importers.io import check_store_empty, probe, write_store
    from dist_ema.store.format import STORAGE_DTYPES
    from dist_ema.store.fs import StoreIO

    t0 = time.perf_counter()
    if is_edm2(kind):
        from dist_ema.importers.edm2 import import_edm2

        return import_edm2(src, store, sigma_rels=sigma_rels, allow_pickle=allow_pickle, edm2_code=edm2_code,
                           update_every=update_every, update_after_step=update_after_step,
                           step_size_correction=step_size_correction, storage_dtype=storage_dtype,
                           average_buffers=average_buffers, storage_options=storage_options)
    lib = resolve_kind(kind)
    if allow_pickle or edm2_code is not None:
        raise ConfigError(f"allow_pickle and edm2_code are for EDM2's pickles (kind 'edm2'); {lib.kind}'s files are "
                          f"read with torch.load(weights_only=True), which runs no code")
    if storage_dtype not in STORAGE_DTYPES:
        raise ConfigError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}; got {storage_dtype!r}")
    if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Sequence) or not sigma_rels:
        raise ConfigError(f"sigma_rels must name the run's profiles in the library's order, e.g. (0.05, 0.10); "
                          f"got {sigma_rels!r}")
    src = os.fspath(src)
    if not os.path.isdir(src):
        raise ConfigError(f"{src} is not a folder: give the checkpoint folder the library wrote")
    _check_apart(src, store)
    scan = scan_names(lib.kind, os.listdir(src), len(sigma_rels), where=src)
    io = StoreIO(store, storage_options)
    check_store_empty(io)
    contents = probe(lib, src, scan, average_buffers)
    u = _update_after_step(lib, scan.steps[0], contents.ema_step, update_after_step)
    plan = plan_import(scan, sigma_rels, update_every, u, step_size_correction)
    if update_every is None:
        log.warning("dist-ema: import: update_every not given: assuming %s's default, %d (pass the run's own, e.g. "
                    "update_every=1 / --update-every 1, if it set one)", lib.kind, plan.update_every)
    for w in plan.warnings:
        log.warning("dist-ema: import: %s", w)
    steps, nbytes = write_store(io, src, plan, contents, storage_dtype, storage_options,
                                lambda n: _imported(plan, n, src, contents))
    errs = ", ".join(f"{c.sigma_rel:g} {100 * c.error:.2f}%" for c in plan.targets)
    log.info("dist-ema: imported %d snapshot(s) of %s from %s into %s: steps %d..%d, t %g..%g (%s), "
             "sigma_rels %s; reconstruction error at the newest step: %s", len(steps), lib.kind, src, io.url,
             plan.steps[0].step, plan.steps[-1].step, plan.steps[0].t, plan.steps[-1].t,
             "exact profiles" if plan.exact else f"update_every={plan.update_every}: nominal profiles",
             list(plan.sigma_rels), errs)
    if plan.repeated:
        log.info("dist-ema: import left out %d step(s) whose EMA had not moved since the previous file: %s",
                 len(plan.repeated), list(plan.repeated[:10]))
    return ImportResult(io.url, lib.kind, tuple(s.step for s in plan.steps), tuple(s.t for s in plan.steps),
                        plan.repeated, plan.sigma_rels, plan.update_every, plan.update_after_step, plan.exact,
                        plan.targets, plan.warnings, contents.buffers, nbytes, time.perf_counter() - t0)


def _check_apart(src: str, store: str) -> None:
    """A local store must not be the source folder or inside it (the import would write among its files)."""
    if "://" in store and not store.startswith("file://"):
        return
    path = os.path.realpath(store[len("file://"):] if store.startswith("file://") else store)
    top = os.path.realpath(src)
    if path == top or path.startswith(top + os.sep):
        raise ConfigError(f"the store {store} is inside the checkpoint folder {src}; give a store outside it")


def _update_after_step(lib: Library, first_step: int, ema_step: tuple[float | None, bool], given: int | None) -> int:
    """pytorch-posthoc-ema's update_after_step: from the files (their own step entry counts the EMA's calls)."""
    if lib.update_after_step == 1:
        if given not in (None, 1):
            raise ConfigError(f"update_after_step is a pytorch-posthoc-ema option; {lib.kind} updates from the "
                              f"first step")
        return 1
    value, exact = ema_step
    exact = value is not None and math.isfinite(value) and value == round(value) and (exact or value <= 2048)
    derived = int(first_step - value + 1) if exact else None
    if given is not None:
        if derived is not None and derived != given:
            raise ConfigError(f"update_after_step={given}, but the files say {derived} (the files of step {first_step} "
                              f"hold the EMA's call {int(value)}); leave it out to use the files'")
        return int(given)
    if derived is None:
        log.warning("dist-ema: import: the files do not say %s's update_after_step exactly; assuming its default "
                    "%d (pass the run's own)", lib.kind, lib.update_after_step)
        return lib.update_after_step
    return derived


def _imported(plan: ImportPlan, n: int, src: str, contents) -> dict:
    """Snapshot n's metadata additions: where it came from and what the library applied."""
    st = plan.steps[n]
    rec = {
        "kind": plan.library.kind, "conventions": plan.library.checked, "source": os.path.abspath(src),
        "files": list(st.files), "file_dtype": contents.file_dtype, "update_every": plan.update_every,
        "update_after_step": plan.update_after_step, "ema_calls": st.calls, "time": plan.time_rule(),
        "profile": "exact: the nominal power-function profiles" if plan.exact else
        f"NOT the nominal profiles (update_every={plan.update_every} with the one-step beta); stored as the "
        f"nominal ones, which synthesis assumes",
        "buffers_from_profile": plan.buffers_profile if contents.buffers else None,
        "left_out_steps": list(plan.repeated),
    }
    if plan.library.kind == "nitrous-ema":
        rec["step_size_correction"] = plan.step_size_correction
    if st.effective_sigma_rels is not None:
        rec["effective_sigma_rels"] = list(st.effective_sigma_rels)
    if n == len(plan.steps) - 1 and plan.profile_errors is not None:
        rec["profile_errors"] = list(plan.profile_errors)
    return {"imported": rec, "t_delta_rule": plan.beta_rule()}
