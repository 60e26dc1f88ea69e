"""EDM2's network-snapshot pickles (github.com/NVlabs/edm2), imported only when the user opts in, and unpickled only
in a child process.

    dist_ema.import_run("edm2", "training-runs/00000-edm2", "runs/edm2/snapshots", allow_pickle=True,
                        edm2_code="edm2")  # a clone of EDM2's repository
    dist-ema import edm2 training-runs/00000-edm2 runs/edm2/snapshots --allow-pickle --edm2-code edm2

EDM2's conventions (read from its code, ``CHECKED``; line numbers there):

- training/training_loop.py l.193-204: rank 0 writes one pickle per tracked std every ``snapshot_nimg`` samples,
  ``network-snapshot-{cur_nimg // 1000:07d}{suffix}.pkl``, the suffix ``-{std:.3f}`` from PowerFunctionEMA.get()
  (training/phema.py l.115; TraditionalEMA and no EMA: no suffix). The pickle is an EasyDict with ``ema`` (the
  EMA network: ``.cpu().eval().to(torch.float16)``, l.198), ``encoder``, ``loss_fn`` and ``dataset_kwargs``.
  l.100 asserts ``snapshot_nimg % 1024 == 0``, so a file's nimg is the one multiple of 1024 with
  ``nimg // 1000 == kimg``: ``(kimg * 1000 + 999) // 1024 * 1024``, as reconstruct_phema.py's kimg_to_nimg
  (l.38-41) maps it back. A snapshot is also written at nimg 0 (the network as initialized); reconstruct_phema.py
  leaves it out (l.93) and so does this import.
- training/phema.py: PowerFunctionEMA deep-copies the network (l.95) and after every training step, with
  ``cur_nimg`` already advanced by the batch (training_loop.py l.239-241), lerps with
  ``beta = (1 - batch_size / cur_nimg) ** (exp + 1)`` (power_function_beta, l.68-69; exp from std by Eq. 126,
  std_to_exp l.28-33): the first update copies the weights (beta 0), and the weights after step n carry the
  power-function profile's mass on ((n-1) B, n B] at t = nimg. That is dist-ema's own power-function EMA with
  time in samples (dist_ema.phema.power_beta with t_delta = batch_size, step_weights): t = nimg, sigma_rel = the
  file name's std. The name rounds std to 3 decimals; EDM2's own reconstruction uses the rounded value
  (reconstruct_phema.py l.64), and so does this import.
- Buffers are not averaged: get() copies the training network's buffers into every EMA (l.112-114) and
  reconstruct_phema copies them from the last pickle (l.144-145). They are stored as snapshot buffers, from the
  smallest std's file.

Unpickling runs code (torch_utils.persistence re-creates the classes from source stored in the pickle), so this
module never unpickles: with ``allow_pickle=True`` it starts ``python -m dist_ema.importers.edm2_child`` with
EDM2's code folder on its ``sys.path`` (``edm2_code``; nothing added by default), which converts one pickle at a
time to a safetensors file in a temporary folder; this process reads those (no pickle) and writes them into the
store with the importer's writer (io.write_store: every snapshot's data before any commit marker), removing
each converted file once written. Disk: at most WINDOW converted files (float as stored) besides the store;
the temporary folder is removed in every case.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dist_ema import phema
from dist_ema.errors import ConfigError
from dist_ema.importers.libraries import EDM2_REFUSAL, Library
from dist_ema.importers.plan import CHECK_TARGETS, SourceStep, TargetCheck

__all__ = ["EDM2", "Edm2Plan", "Edm2Scan", "import_edm2", "kimg_to_nimg", "plan_edm2", "scan_edm2"]

log = logging.getLogger("dist_ema")

CHECKED = "NVlabs/edm2 4bf8162 (Autoguidance release)"
EDM2 = Library(
    kind="edm2", checked=CHECKED, prefix="", state_keys=(), update_every=1, checkpoint_dtype="float16",
    refs="training/training_loop.py: snapshot files l.193-204 (name l.199, ema cast to float16 l.198), "
         "snapshot_nimg % 1024 == 0 l.100, cur_nimg advanced before ema.update l.239-241; training/phema.py: "
         "power_function_beta l.68-69, PowerFunctionEMA deep copy l.95, update l.104-109, get() buffers copied "
         "and suffix -{std:.3f} l.111-115, TraditionalEMA.get() no suffix l.151-154; reconstruct_phema.py: "
         "kimg_to_nimg l.38-41, file name pattern l.59, nimg > 0 only l.93, parameters combined and buffers copied "
         "l.142-145; training/phema.py solve_posthoc_coefficients normalized l.76-85",
)
SNAPSHOT = re.compile(r"^(?P<prefix>.*)-(?P<kimg>\d+)-(?P<std>\d+\.\d+)\.pkl$")  # as reconstruct_phema.py l.59
NO_STD = re.compile(r"^(?P<prefix>.*)-(?P<kimg>\d+)\.pkl$")  # TraditionalEMA's (or no EMA's) snapshots
TRAINING_PREFIX = "network-snapshot"
WINDOW = 2  # converted files waiting for this process at most (disk: WINDOW files besides the store)
CODE_HINT = ("give the folder of EDM2's code, the one holding dnnlib/ and torch_utils/ (a clone of "
             "github.com/NVlabs/edm2): --edm2-code PATH (import_run(..., edm2_code=PATH))")


def kimg_to_nimg(kimg: int) -> int | None:
    """The nimg of a file named with ``kimg`` (EDM2's snapshots are at multiples of 1024 samples), or None where
    no multiple of 1024 has that kimg (a name EDM2's training loop cannot have written)."""
    nimg = (int(kimg) * 1000 + 999) // 1024 * 1024
    return nimg if nimg // 1000 == int(kimg) else None


@dataclass(frozen=True)
class Edm2Scan:
    """An EDM2 run folder's snapshots: ``files[n][k]`` is std k's file at ``nimgs[n]`` (stds ascending)."""

    prefix: str
    kimgs: tuple[int, ...]
    nimgs: tuple[int, ...]
    stds: tuple[str, ...]  # as the file names spell them ("0.050")
    files: tuple[tuple[str, ...], ...]
    left_out: tuple[str, ...] = ()  # the files at nimg 0 (the network as initialized)
    ignored: tuple[str, ...] = ()  # other entries of the folder (EDM2's training-state-*.pt, logs, ...)


def scan_edm2(names: Sequence[str], where: str = "the folder") -> Edm2Scan:
    """Group an EDM2 run folder's file names into snapshots (pure)."""
    by_nimg: dict[int, dict[str, str]] = {}
    kimg_of: dict[int, int] = {}
    prefixes: dict[str, str] = {}
    no_std, other_pkl, ignored, left_out, bad_kimg = [], [], [], [], []
    for n in sorted(str(x) for x in names):
        m = SNAPSHOT.match(n)
        if m:
            prefixes.setdefault(m.group("prefix"), n)
            kimg = int(m.group("kimg"))
            nimg = kimg_to_nimg(kimg)
            if nimg is None:
                bad_kimg.append(n)
            elif nimg == 0:
                left_out.append(n)
            else:
                by_nimg.setdefault(nimg, {})[m.group("std")] = n
                kimg_of[nimg] = kimg
        elif NO_STD.match(n):
            no_std.append(n)
        elif n.endswith(".pkl"):
            other_pkl.append(n)
        else:
            ignored.append(n)
    if no_std:
        raise ConfigError(
            f"{where} holds EDM2 snapshots without a std in their names "
            f"({no_std[0]}{', ...' if len(no_std) > 1 else ''}): EDM2 names its files so when the run used "
            f"TraditionalEMA (or no EMA), whose single EMA is not a power-function profile; post-hoc synthesis "
            f"needs PowerFunctionEMA's files (network-snapshot-<kimg>-<std>.pkl, one per std). dist-ema does not "
            f"import these"
        )
    if other_pkl:
        raise ConfigError(f"{where} holds .pkl files not named like EDM2's snapshots (<prefix>-<kimg>-<std>.pkl): "
                          f"{other_pkl[:5]}; import a folder holding one run's snapshots only (move the others out)")
    if bad_kimg:
        kimg = SNAPSHOT.match(bad_kimg[0])["kimg"]
        raise ConfigError(f"{where}: {bad_kimg[0]}: no multiple of 1024 samples has kimg {kimg}"
                          f" (EDM2's training loop writes snapshots at multiples of 1024 samples, training_loop.py "
                          f"l.100): not a file of EDM2's training loop, or a renamed one")
    if len(prefixes) > 1:
        shown = ", ".join(f"{p!r} ({n})" for p, n in sorted(prefixes.items())[:4])
        raise ConfigError(f"{where} holds snapshots with {len(prefixes)} name prefixes: {shown}; import one run's "
                          f"files (move the others out)")
    if not by_nimg:
        what = (f"only the snapshots at nimg 0 ({left_out[0]}, ...), the network as initialized, which post-hoc "
                f"EMA leaves out" if left_out else "no EDM2 snapshots (network-snapshot-<kimg>-<std>.pkl)")
        raise ConfigError(f"{where} holds {what}; give the run folder EDM2's training loop wrote (its run_dir)")
    stds = sorted({s for files in by_nimg.values() for s in files}, key=float)
    if len({float(s) for s in stds}) < len(stds):
        raise ConfigError(f"{where}: the file names spell one std in several ways ({stds}): files of several runs or "
                          f"renamed files; import one run's files")
    incomplete = {nimg: [s for s in stds if s not in f] for nimg, f in by_nimg.items() if len(f) < len(stds)}
    if incomplete:
        shown = "; ".join(f"kimg {kimg_of[nimg]}: no std {', '.join(miss)}"
                          for nimg, miss in sorted(incomplete.items())[:5])
        raise ConfigError(f"{where}: {len(incomplete)} snapshot(s) lack a std's file ({shown}): a snapshot written "
                          f"in part (the run stopped while writing), files removed by hand, or runs with other stds "
                          f"in one folder; remove that kimg's other files to import the rest")
    nimgs = tuple(sorted(by_nimg))
    (prefix,) = prefixes
    return Edm2Scan(prefix, tuple(kimg_of[n] for n in nimgs), nimgs, tuple(stds),
                    tuple(tuple(by_nimg[n][s] for s in stds) for n in nimgs), tuple(left_out), tuple(ignored))


@dataclass(frozen=True)
class Edm2Plan:
    """What an EDM2 import writes: one snapshot per nimg, its files in std order (the attributes io.write_store
    reads: library, steps, sigma_rels, gammas, update_every, buffers_profile)."""

    scan: Edm2Scan
    sigma_rels: tuple[float, ...]
    gammas: tuple[float, ...]
    steps: tuple[SourceStep, ...]
    targets: tuple[TargetCheck, ...]
    warnings: tuple[str, ...] = field(default=())
    library: Library = EDM2
    update_every: int = 1
    update_after_step: int = 1
    buffers_profile: int = 0  # the smallest std's file (every std's file holds the same buffers)
    exact: bool = True

    def time_rule(self) -> str:
        return ("t = nimg (samples) = (kimg * 1000 + 999) // 1024 * 1024 from the file name (EDM2's snapshots are at "
                "multiples of 1024 samples; reconstruct_phema.py kimg_to_nimg); EDM2's PowerFunctionEMA copies the "
                "weights at the first step and then applies beta = (1 - batch_size / nimg)^(gamma + 1) after every "
                "step: the power-function profile at t = nimg")

    def beta_rule(self) -> str:
        return ("edm2: beta = (1 - batch_size / nimg)^(gamma + 1) after every training step, nimg counting the "
                "samples up to and including that step (training/phema.py power_function_beta); time in samples")


def plan_edm2(scan: Edm2Scan, sigma_rels: Sequence[float] | None = None,
              targets: Sequence[float] = CHECK_TARGETS) -> Edm2Plan:
    """Times and profiles from the file names (pure); ``sigma_rels``, when given, must be the names' stds."""
    stds = np.array([float(s) for s in scan.stds])
    try:
        phema.validate_sigma_rel(stds, "std")
    except ConfigError as e:
        raise ConfigError(f"the file names' stds {list(scan.stds)} are not sigma_rels dist-ema can track: "
                          f"{e}") from None
    if sigma_rels is not None:
        if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Sequence):
            raise ConfigError(f"sigma_rels must be numbers, e.g. (0.05, 0.10); got {sigma_rels!r}")
        given = sorted(f"{float(s):.3f}" for s in sigma_rels)
        if given != list(scan.stds):
            raise ConfigError(f"--sigma-rels {' '.join(f'{float(s):g}' for s in sigma_rels)} does not match the "
                              f"stds of EDM2's file names, {' '.join(scan.stds)} (the names give them: leave "
                              f"--sigma-rels out)")
    g = np.atleast_1d(phema.sigma_rel_to_gamma(stds))
    steps = tuple(SourceStep(kimg, files, 0, 0, float(nimg), float(nimg))
                  for kimg, nimg, files in zip(scan.kimgs, scan.nimgs, scan.files))
    t = np.array(scan.nimgs, dtype=np.float64)
    tg_s = np.array(sorted(set(stds.tolist()) | set(targets)))
    sol = phema.solve_coefficients(np.repeat(t, g.size), np.tile(g, t.size), np.full(tg_s.size, t[-1]),
                                   np.atleast_1d(phema.sigma_rel_to_gamma(tg_s)))
    checks = tuple(TargetCheck(float(s), float(e)) for s, e in zip(tg_s, sol.error))
    warnings = []
    if scan.prefix != TRAINING_PREFIX:
        warnings.append(f"the files are named {scan.prefix}-<kimg>-<std>.pkl, not {TRAINING_PREFIX}-...: EDM2's "
                        f"training loop writes {TRAINING_PREFIX}-... files; others (reconstruct_phema.py writes "
                        f"phema-...) may be reconstructions, which are not exactly the power-function profiles "
                        f"synthesis assumes")
    return Edm2Plan(scan, tuple(float(x) for x in stds), tuple(float(x) for x in g), steps, checks, tuple(warnings))


# ----------------------------------------------------------------------------- the child process


def _child_message(rec: dict, code: str | None) -> str:
    """A ConfigError's text for the child's error record: the file, the reason, the fix."""
    where, what = rec.get("file", "?"), f"{rec.get('type')}: {rec.get('message', '')}"
    if rec.get("error") == "no-ema":
        return (f"{where}: {rec.get('message')}: not a network snapshot of EDM2's training loop (an EasyDict with "
                f"'ema', 'encoder', 'loss_fn', 'dataset_kwargs'); import a folder of network-snapshot-*.pkl files. "
                f"Nothing was imported")
    if rec.get("type") in ("ModuleNotFoundError", "ImportError"):
        missing = f" (module {rec['missing']!r})" if rec.get("missing") else ""
        given = (f"--edm2-code {code} does not provide it" if code else
                 "no --edm2-code was given, so only the Python path the child inherits was searched")
        return (f"{where}: loading it runs EDM2's code, which the child process cannot import{missing}: {what}; "
                f"{given}. Fix: {CODE_HINT}. Nothing was imported")
    if rec.get("error") == "load":
        return (f"{where}: cannot be loaded ({what}): a damaged or truncated file (a snapshot written while the run "
                f"stopped?), one not written by EDM2, or EDM2 code that does not match it; remove it and the other "
                f"stds' files of its kimg (or restore it) to import the rest. Nothing was imported")
    return f"{where}: the EMA network cannot be converted ({what}). Nothing was imported"


class _Child:
    """``python -m dist_ema.importers.edm2_child`` converting ``files`` in order; records taken one by one."""

    def __init__(self, files: list[str], code: str | None, tmp: str) -> None:
        self.files, self.code, self.tmp = files, code, tmp
        self.proc: subprocess.Popen | None = None
        self.pending: dict | None = None
        self.taken = 0

    def start(self) -> None:
        jobs = os.path.join(self.tmp, "jobs.json")
        with open(jobs, "w") as f:
            json.dump({"files": self.files}, f)
        cmd = [sys.executable, "-m", "dist_ema.importers.edm2_child", "--jobs", jobs, "--out", self.tmp,
               "--window", str(WINDOW)]
        if self.code is not None:
            cmd += ["--code", os.path.abspath(self.code)]
        env = dict(os.environ)
        # dist-ema importable as it is here (its folder first); the child's working folder is the empty
        # temporary one, so nothing of the caller's working folder is importable there
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.log_path = os.path.join(self.tmp, "child.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.tmp, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True)
        log.info("dist-ema: import edm2: loading %d pickle(s) in a child process (pid %d)%s", len(self.files),
                 self.proc.pid, f" with {self.code} on its path" if self.code else "")

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 1500))
                return f.read().decode(errors="replace").strip()
        except OSError:
            return ""

    def _record(self) -> dict:
        """The child's next JSON line; ConfigError for its error records and for its end without one."""
        i = self.taken
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            raise ConfigError(f"{self.files[i]}: the child process that loads EDM2's pickles ended (exit {rc}) "
                              f"before converting it; its last output: {self._log_tail()[-800:] or '(none)'}. "
                              f"Nothing was imported")
        rec = json.loads(line)
        if "error" in rec:
            raise ConfigError(_child_message(rec, self.code))
        if rec.get("i") != i or rec.get("file") != self.files[i]:
            raise ConfigError(f"the child process converted {rec.get('file')} where {self.files[i]} was expected")
        return rec

    def peek(self) -> dict:
        """The next file's record, without taking it (its tensors stay for :meth:`next`)."""
        if self.pending is None:
            self.pending = self._record()
        return self.pending

    def next(self) -> tuple[dict, dict]:
        """The next file's (manifest record, tensors); its converted file is removed once read."""
        from safetensors.torch import load_file

        rec = self.peek()
        self.pending = None
        path = os.path.join(self.tmp, rec["out"])
        tensors = load_file(path)  # a safetensors file: tensors only, no code
        os.remove(path)
        self.taken += 1
        return rec, tensors

    def ack(self) -> None:
        try:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
        except OSError:  # the child has ended: its output says why, at the next record
            pass

    def close(self, ok: bool) -> None:
        if self.proc is not None:
            if ok:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            elif self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for s in (self.proc.stdout, self.proc.stdin):
                try:
                    s.close()
                except (OSError, ValueError):
                    pass
        if getattr(self, "_log", None) is not None:
            self._log.close()


def _contents(rec: dict, where: str):
    """The run's Contents from the first converted file's record."""
    from dist_ema.importers.io import Contents

    params, buffers, dtypes = [], [], []
    for n, shape, dt in rec["params"]:
        if dt in ("float32", "float16", "bfloat16", "float64"):
            params.append((n, tuple(shape), dt))
            dtypes.append(dt)
        else:
            buffers.append(n)
    buffers += [n for n, _, _ in rec["buffers"]]
    if not params:
        raise ConfigError(f"{where}: its EMA network holds no floating-point parameters to import")
    bits = {"float64": 64, "float32": 32, "float16": 16, "bfloat16": 16}
    return Contents(tuple(params), tuple(buffers), dict(rec["ties"]), max(dtypes, key=bits.__getitem__), (None, False))


def _table(rec: dict) -> tuple:
    return (sorted(map(tuple, ((n, tuple(s), d) for n, s, d in rec["params"]))),
            sorted(map(tuple, ((n, tuple(s), d) for n, s, d in rec["buffers"]))), sorted(rec["ties"].items()))


def import_edm2(src: str, store: str, *, sigma_rels: Sequence[float] | None, allow_pickle: bool,
                edm2_code: str | None, update_every: int | None, update_after_step: int | None,
                step_size_correction: bool, storage_dtype: str, average_buffers: bool,
                storage_options: dict | None):
    """import_run's EDM2 path (see :func:`dist_ema.importers.import_run`)."""
    from dist_ema.importers import ImportResult, _check_apart
    from dist_ema.importers.io import check_store_empty, write_store
    from dist_ema.store.format import STORAGE_DTYPES
    from dist_ema.store.fs import StoreIO

    t0 = time.perf_counter()
    if not allow_pickle:
        raise ConfigError(EDM2_REFUSAL)
    if update_every not in (None, 1):
        raise ConfigError(f"update_every={update_every}: EDM2's PowerFunctionEMA updates after every training step; "
                          f"leave --update-every out for edm2")
    if update_after_step is not None or step_size_correction:
        raise ConfigError("update_after_step and step_size_correction are options of the other libraries; EDM2 has "
                          "neither")
    if average_buffers:
        raise ConfigError("average_buffers: EDM2 does not average buffers (PowerFunctionEMA.get() copies the "
                          "network's, reconstruct_phema.py copies them); they are stored as snapshot buffers")
    if storage_dtype not in STORAGE_DTYPES:
        raise ConfigError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}; got {storage_dtype!r}")
    src = os.fspath(src)
    if not os.path.isdir(src):
        raise ConfigError(f"{src} is not a folder: give the run folder EDM2's training loop wrote")
    if edm2_code is not None:
        edm2_code = os.fspath(edm2_code)
        if not os.path.isdir(edm2_code):
            raise ConfigError(f"--edm2-code {edm2_code} is not a folder: {CODE_HINT}")
    _check_apart(src, store)
    scan = scan_edm2(os.listdir(src), where=src)
    plan = plan_edm2(scan, sigma_rels)
    io = StoreIO(store, storage_options)
    check_store_empty(io)
    for w in plan.warnings:
        log.warning("dist-ema: import: %s", w)
    if scan.left_out:
        log.info("dist-ema: import edm2: left out %d file(s) at nimg 0 (the network as initialized; EDM2's "
                 "reconstruction leaves them out too): %s", len(scan.left_out), list(scan.left_out))

    files = [os.path.join(os.path.abspath(src), name) for st in plan.steps for name in st.files]
    tmp = tempfile.mkdtemp(prefix="dist-ema-edm2-")
    child = _Child(files, edm2_code, tmp)
    ok = False
    try:
        child.start()
        first = child.peek()
        contents = _contents(first, files[0])
        table = _table(first)

        def read(n: int, k: int, path: str) -> dict:
            rec, tensors = child.next()
            if _table(rec) != table:
                raise ConfigError(f"{path} does not hold the tensors {files[0]} holds (names, shapes or dtypes "
                                  f"differ): files of different models or runs in one folder; import one run's "
                                  f"folder. Nothing was imported")
            child.ack()
            return tensors

        def extra(n: int) -> dict:
            st = plan.steps[n]
            return {"imported": {
                "kind": "edm2", "conventions": CHECKED, "source": os.path.abspath(src), "files": list(st.files),
                "file_dtype": contents.file_dtype, "prefix": scan.prefix, "kimg": st.step, "nimg": int(st.t),
                "ema_class": first.get("ema_class"), "time": plan.time_rule(),
                "sigma_rels_from": "the file names' std, which the name rounds to 3 decimals (EDM2's own "
                                   "reconstruction uses the rounded value too)",
                "profile": "exact: the nominal power-function profiles",
                "buffers_from_profile": plan.buffers_profile if contents.buffers else None,
                "left_out_files": list(scan.left_out), "unpickled_in": "a child process (--allow-pickle)",
            }, "t_delta_rule": plan.beta_rule()}

        steps, nbytes = write_store(io, src, plan, contents, storage_dtype, storage_options, extra, read=read,
                                    unit="samples")
        ok = True
    finally:
        child.close(ok)
        shutil.rmtree(tmp, ignore_errors=True)
    errs = ", ".join(f"{c.sigma_rel:g} {100 * c.error:.2f}%" for c in plan.targets)
    log.info("dist-ema: imported %d snapshot(s) of edm2 from %s into %s: kimg %d..%d, t %d..%d samples, sigma_rels "
             "%s (from the file names); reconstruction error at the newest snapshot: %s", len(steps), src, io.url,
             plan.steps[0].step, plan.steps[-1].step, int(plan.steps[0].t), int(plan.steps[-1].t),
             list(plan.sigma_rels), errs)
    return ImportResult(io.url, "edm2", tuple(s.step for s in plan.steps), tuple(s.t for s in plan.steps), (),
                        plan.sigma_rels, 1, 1, True, plan.targets, plan.warnings, contents.buffers, nbytes,
                        time.perf_counter() - t0, unit="samples", left_out=scan.left_out)
