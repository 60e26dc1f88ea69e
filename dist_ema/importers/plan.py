"""Import planning: which files, which steps, which times and profiles (pure: file names in, a plan out).

:func:`scan_names` reads a checkpoint folder's file names (``<profile>.<step>.pt``) into steps,
each with one file per profile, and refuses what cannot be one run (no files, profile indices
that do not match the profiles named, a step missing a profile's file, other ``.pt`` files).
:func:`plan_import` gives every step its time and says what the library actually applied:

    i = step - update_after_step + 1                      the EMA's own call count at the file
    last update u = 1 + k * floor((i - 1) / k)            k = update_every
    t = u + 1,  t_now = i + 1                             (libraries.py: the profile at t = u + 1)

A step whose EMA has not moved since the previous file (k > 1, files closer than k steps) has
the previous file's t and data: it is left out, as dist-ema's own ``snapshot()`` takes no second
snapshot of an EMA that has not moved. With k > 1 the profiles are not the nominal ones: the
plan measures how far they are (profiles.py) and what that does to synthesis, and the
snapshots keep the nominal (sigma_rel, gamma) with that record in their metadata.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from dist_ema import phema
from dist_ema.errors import ConfigError
from dist_ema.importers import profiles
from dist_ema.importers.libraries import EDM2_REFUSAL, FILE_NAME, Library, resolve_kind

__all__ = ["ImportPlan", "Scan", "SourceStep", "TargetCheck", "plan_import", "scan_names"]

CHECK_TARGETS = (0.10, 0.15)  # targets whose reconstruction error an import reports, with the tracked sigma_rels
PROFILE_WARN = 0.01  # an applied profile further than this (relative L2) from the nominal one is warned about
MAX_ANALYSIS_UPDATES = 5_000_000  # updates the applied-profile analysis walks at most (beyond: not measured)
MAX_LIBRARY_ROWS = 2048  # files whose library coefficients are solved (dense, as the library does) at most


@dataclass(frozen=True)
class Scan:
    """A checkpoint folder's files by step: ``files[n][k]`` is profile k's file at ``steps[n]``."""

    library: Library
    steps: tuple[int, ...]
    files: tuple[tuple[str, ...], ...]
    ignored: tuple[str, ...] = ()  # other entries of the folder (not .pt files)


@dataclass(frozen=True)
class SourceStep:
    """One imported step: its files (one per profile, in profile order) and its time."""

    step: int  # the library's step count, from the file name
    files: tuple[str, ...]
    calls: int  # the EMA's own calls at the file
    updates: int  # EMA updates applied by then
    t: float  # last update + 1 (the time the profile refers to)
    t_now: float  # calls + 1
    effective_sigma_rels: tuple[float, ...] | None = None  # k > 1: std of the applied weights / t, per profile


@dataclass(frozen=True)
class TargetCheck:
    """A target's reconstruction at the newest snapshot's time.

    ``error``: what synthesis reports (the nominal profiles' least-squares error, continuous);
    ``applied_error``: the same coefficients applied to the weights the library actually
    applied, compared with the target on the update steps (discrete; close to ``error`` when
    update_every = 1, larger with the one-step beta of update_every > 1); ``library_error``:
    the same for the library's own ``synthesize_ema_model`` coefficients (its t = file step,
    not normalized); ``full_run_error``: ``error`` with files at the same interval over the
    whole run (only when the folder lacks the run's early files). None: not measured (runs of
    more than MAX_ANALYSIS_UPDATES updates; the library's: more than MAX_LIBRARY_ROWS files).
    """

    sigma_rel: float
    error: float
    applied_error: float | None = None
    library_error: float | None = None
    full_run_error: float | None = None


@dataclass(frozen=True)
class ImportPlan:
    library: Library
    sigma_rels: tuple[float, ...]
    gammas: tuple[float, ...]
    update_every: int
    update_after_step: int
    step_size_correction: bool
    steps: tuple[SourceStep, ...]  # imported, oldest first
    repeated: tuple[int, ...]  # steps left out: the EMA had not moved since the previous file
    targets: tuple[TargetCheck, ...] = ()
    profile_errors: tuple[float, ...] | None = None  # k > 1: newest snapshot, applied vs nominal, per profile
    truncated: tuple[int, int] | None = None  # (first step the EMA ran, first step with files) when files are gone
    warnings: tuple[str, ...] = field(default=())

    @property
    def exact(self) -> bool:
        """True when the files hold the nominal power-function profiles (one update per step, plain beta)."""
        return self.update_every == 1 and not self.step_size_correction

    @property
    def buffers_profile(self) -> int:
        """The profile whose files give a snapshot's buffers: the smallest sigma_rel (the shortest average)."""
        return int(np.argmin(self.sigma_rels))

    def time_rule(self) -> str:
        u = self.update_after_step
        calls = "step" if u == 1 else f"step - {u - 1}"
        return (f"t = (the EMA's last update call) + 1; the EMA's calls = {calls}: {self.library.kind} copies the "
                f"weights at its first update and then applies beta = (1 - 1/(i + 1))^(gamma + 1) at call i, which "
                f"is the power-function profile at t = i + 1 when it updates every call")

    def beta_rule(self) -> str:
        k = self.update_every
        rule = ("beta = ((1 - 1/(i+1))^(gamma+1) (1 - 1/(i+1+k))^(gamma+1))^(k/2)" if self.step_size_correction
                else "beta = (1 - 1/(i+1))^(gamma+1)")
        if self.exact:
            return f"{self.library.kind}: {rule} at every call i (the first copies the weights)"
        return (f"{self.library.kind}: {rule} at calls i = 1, 1+{k}, 1+{2 * k}, ... (update_every={k}; the first "
                f"copies the weights): the one-step beta once per {k} steps, NOT the power-function profile")


def scan_names(kind: str, names: Iterable[str], profiles_count: int, where: str = "the folder") -> Scan:
    """Group a checkpoint folder's file names into steps (pure). ``profiles_count``: the profiles named."""
    lib = resolve_kind(kind)
    names = sorted(str(n) for n in names)
    by_step: dict[int, dict[int, str]] = {}
    other_pt, ignored, edm2 = [], [], []
    for n in names:
        m = FILE_NAME.match(n)
        if m:
            by_step.setdefault(int(m.group(2)), {})[int(m.group(1))] = n
        elif n.startswith("network-snapshot-") and n.endswith(".pkl"):
            edm2.append(n)
        elif n.endswith((".pt", ".pth", ".pkl", ".safetensors", ".bin")):
            other_pt.append(n)
        else:
            ignored.append(n)
    if edm2:
        raise ConfigError(f"{where} holds EDM2 snapshots ({edm2[0]}, ...). {EDM2_REFUSAL}")
    if other_pt:
        raise ConfigError(f"{where} holds checkpoint files that are not named like {lib.kind}'s "
                          f"(<profile index>.<step>.pt): {other_pt[:5]}; import a folder holding one run's EMA "
                          f"files only (move the others out)")
    if not by_step:
        raise ConfigError(f"{where} holds no {lib.kind} checkpoint files (<profile index>.<step>.pt); give the "
                          f"folder the library wrote (ema-pytorch: checkpoint_folder, posthoc-ema: checkpoint_dir)")
    indices = sorted({i for files in by_step.values() for i in files})
    if indices != list(range(len(indices))):
        raise ConfigError(f"{where}: the profile indices in the file names are {indices}, not 0..{len(indices) - 1}: "
                          f"files of several runs or a damaged folder; import one run's folder")
    if len(indices) != profiles_count:
        raise ConfigError(
            f"{where} holds {len(indices)} profile(s) (file names {indices[0]}.<step>.pt .. "
            f"{indices[-1]}.<step>.pt) but {profiles_count} sigma_rel(s) were given; name every profile the run "
            f"tracked, in its order (the files do not record sigma_rel), e.g. --sigma-rels "
            f"{' '.join(['S'] * len(indices))}"
        )
    incomplete = {s: [i for i in indices if i not in f] for s, f in by_step.items() if len(f) < len(indices)}
    if incomplete:
        shown = "; ".join(f"step {s}: no {', '.join(f'{i}.{s}.pt' for i in miss)}"
                          for s, miss in sorted(incomplete.items())[:5])
        raise ConfigError(f"{where}: {len(incomplete)} step(s) lack a profile's file ({shown}): a checkpoint written "
                          f"in part (the run stopped while writing) or files removed by hand; remove that step's "
                          f"other files to import the rest")
    steps = tuple(sorted(by_step))
    return Scan(lib, steps, tuple(tuple(by_step[s][i] for i in indices) for s in steps), tuple(ignored))


def plan_import(scan: Scan, sigma_rels: Sequence[float], update_every: int | None = None,
                update_after_step: int | None = None, step_size_correction: bool = False,
                targets: Sequence[float] = CHECK_TARGETS) -> ImportPlan:
    """Times, profiles and what was applied, for the steps of ``scan`` (pure)."""
    lib = scan.library
    s = phema.validate_sigma_rel(np.asarray(list(sigma_rels), dtype=np.float64), "sigma_rels")
    if s.ndim != 1 or len(set(s.tolist())) != s.size:
        raise ConfigError(f"sigma_rels must be distinct numbers, one per profile; got {list(sigma_rels)}")
    g = np.atleast_1d(phema.sigma_rel_to_gamma(s))
    k = lib.update_every if update_every is None else update_every
    u = lib.update_after_step if update_after_step is None else update_after_step
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"update_every must be an integer >= 1 (the run's, e.g. 1); got {k!r}")
    if isinstance(u, bool) or not isinstance(u, (int, np.integer)) or u < 1:
        raise ConfigError(f"update_after_step must be an integer >= 1; got {u!r}")
    if step_size_correction and lib.kind != "nitrous-ema":
        raise ConfigError(f"step_size_correction is a nitrous-ema option; {lib.kind} has none")
    k, u = int(k), int(u)
    early = [st for st in scan.steps if lib.ema_calls(st, u) < 1]
    if early:
        raise ConfigError(f"files at step {early[0]} are before update_after_step={u}, when {lib.kind} has not "
                          f"started its EMA; give the run's update_after_step")
    kept: list[SourceStep] = []
    repeated: list[int] = []
    for st, files in zip(scan.steps, scan.files):
        i = lib.ema_calls(st, u)
        n_upd = (i - 1) // k + 1
        t = float(1 + k * (n_upd - 1) + 1)
        if kept and kept[-1].t == t:
            repeated.append(st)  # the EMA has not moved since the previous file: the same t and data
            continue
        kept.append(SourceStep(st, files, i, n_upd, t, float(i + 1)))
    plan = ImportPlan(lib, tuple(float(x) for x in s), tuple(float(x) for x in g), k, u, bool(step_size_correction),
                      tuple(kept), tuple(repeated))
    return _analyse(plan, scan, targets)


def _analyse(plan: ImportPlan, scan: Scan, targets: Sequence[float]) -> ImportPlan:
    """The plan with its measurements: effective profiles and target errors (k > 1), truncation, warnings."""
    steps, k, corr = plan.steps, plan.update_every, plan.step_size_correction
    g = np.asarray(plan.gammas)
    t = np.array([x.t for x in steps])
    rows_t, rows_g = np.repeat(t, g.size), np.tile(g, t.size)
    tg_s = np.array(sorted(set(plan.sigma_rels) | set(targets)))
    tg_g = np.atleast_1d(phema.sigma_rel_to_gamma(tg_s))
    sol = phema.solve_coefficients(rows_t, rows_g, np.full(tg_s.size, t[-1]), tg_g)
    warnings: list[str] = []
    n_upd = steps[-1].updates
    analyse = n_upd <= MAX_ANALYSIS_UPDATES
    applied = [None] * tg_s.size
    library = [None] * tg_s.size
    prof_err = None
    if analyse:
        last = [x.updates - 1 for x in steps]  # each snapshot's last update, 0-based
        edges = profiles.bin_edges(np.arange(n_upd, dtype=np.int64) * k + 1)
        lib_rows = len(scan.steps) * g.size <= MAX_LIBRARY_ROWS
        lib_x = _library_coefficients(plan, scan, tg_g) if lib_rows else None
        lib_last = [(plan.library.ema_calls(st, plan.update_after_step) - 1) // k for st in scan.steps]
        for j in range(tg_s.size):
            target = profiles.nominal_weights(tg_g[j], edges)
            x = sol.coefficients[:, j].reshape(t.size, g.size)
            w = sum(profiles.combined_weights(g[p], k, corr, last, x[:, p], n_upd) for p in range(g.size))
            applied[j] = profiles.relative_l2(w, target, edges)
            if lib_x is not None:
                xl = lib_x[:, j].reshape(len(scan.steps), g.size)
                wl = sum(profiles.combined_weights(g[p], k, corr, lib_last, xl[:, p], n_upd) for p in range(g.size))
                library[j] = profiles.relative_l2(wl, target, edges)
        if k > 1 or corr:
            eff = np.stack([profiles.effective_sigma_rels(g[p], k, corr, [x.calls for x in steps])
                            for p in range(g.size)], axis=1)  # => [steps, profiles]
            steps = tuple(replace(x, effective_sigma_rels=tuple(float(v) for v in eff[n]))
                          for n, x in enumerate(steps))
            prof_err = []
            for p in range(g.size):
                upd, w = profiles.applied_weights(g[p], steps[-1].calls, k, corr)
                prof_err.append(profiles.relative_l2(w, profiles.nominal_weights(g[p], profiles.bin_edges(upd)),
                                                     profiles.bin_edges(upd)))
    truncated, full = _truncation(plan, steps, tg_g)
    checks = tuple(TargetCheck(float(sr), float(e), applied[j], library[j], None if full is None else float(full[j]))
                   for j, (sr, e) in enumerate(zip(tg_s, sol.error)))
    if prof_err is not None and max(prof_err) > PROFILE_WARN:
        newest = steps[-1]
        eff = ", ".join(f"{s:g} -> {e:.3f}" for s, e in zip(plan.sigma_rels, newest.effective_sigma_rels or ()))
        errs = ", ".join(f"sigma_rel {c.sigma_rel:g}: {100 * c.applied_error:.1f}% (nominal {100 * c.error:.2f}%)"
                         for c in checks if c.applied_error is not None)
        warnings.append(
            f"{plan.library.kind} updated the EMA every {k} steps with the one-step beta, so the files do NOT hold "
            f"the nominal power-function profiles: at step {newest.step} the profiles' relative L2 distance from "
            f"the nominal ones is {', '.join(f'{100 * e:.0f}%' for e in prof_err)} and their effective sigma_rels "
            f"are {eff}. The snapshots are imported as the nominal profiles (synthesis assumes them); the "
            f"synthesized profiles then differ from the targets by: {errs}. Each snapshot's metadata records "
            f"what was applied ('imported')"
        )
    elif not plan.exact and not analyse:
        warnings.append(
            f"{plan.library.kind} updated the EMA every {k} steps with the one-step beta, so the files do NOT hold "
            f"the nominal power-function profiles (much wider ones; not measured: more than {MAX_ANALYSIS_UPDATES:,} "
            f"updates). The snapshots are imported as the nominal profiles, which synthesis assumes; each "
            f"snapshot's metadata records what was applied ('imported')"
        )
    if truncated is not None:
        errs = ", ".join(f"sigma_rel {c.sigma_rel:g}: {100 * c.error:.1f}% (a full run's files: "
                         f"{100 * c.full_run_error:.2f}%)" for c in checks
                         if c.full_run_error is not None and c.sigma_rel not in plan.sigma_rels)
        keeps = (f" ({plan.library.kind} keeps only the last {plan.library.keeps} files per profile by default)"
                 if plan.library.keeps else "")
        warnings.append(
            f"the files cover only the end of the run: the EMA started at step {truncated[0]}, the first file left is "
            f"at step {truncated[1]}{keeps}. Synthesis can combine only the profiles left, so targets other than the "
            f"tracked ones reconstruct badly: reconstruction error at step {steps[-1].step}: {errs}"
        )
    return replace(plan, steps=steps, targets=checks, profile_errors=None if prof_err is None else tuple(prof_err),
                   truncated=truncated, warnings=tuple(warnings))


def _library_coefficients(plan: ImportPlan, scan: Scan, target_gammas: np.ndarray) -> np.ndarray:
    """The coefficients the library's own ``synthesize_ema_model`` uses for the newest step: every file, t = its
    step, A x = b solved as is (not normalized); pytorch-posthoc-ema solves in float32. => [files, targets]"""
    ts = np.repeat(np.asarray(scan.steps, dtype=np.float64), len(plan.gammas))
    gs = np.tile(np.asarray(plan.gammas), len(scan.steps))
    A = phema.p_dot_p(ts[:, None], gs[:, None], ts[None, :], gs[None, :])
    B = phema.p_dot_p(ts[:, None], gs[:, None], ts.max(), target_gammas[None, :])
    if plan.library.kind == "posthoc-ema":
        return np.linalg.lstsq(A.astype(np.float32), B.astype(np.float32), rcond=None)[0].astype(np.float64)
    return np.linalg.lstsq(A, B, rcond=None)[0]


def _truncation(plan: ImportPlan, steps: Sequence[SourceStep], target_gammas: np.ndarray):
    """((EMA start step, first file step), errors with a full run's files) when the run's early files are gone."""
    if len(steps) < 2:
        return None, None
    gap = min(b.calls - a.calls for a, b in zip(steps, steps[1:]))
    if steps[0].calls <= 1.5 * gap:
        return None, None
    t_last = steps[-1].t
    n = int(math.floor((t_last - 1.0) / gap))
    if n > 100_000:  # the error is known to be small with that many files: do not solve for it
        return (plan.update_after_step, steps[0].step), None
    t_full = t_last - gap * np.arange(n, -1, -1, dtype=np.float64)
    t_full = t_full[t_full > 1.0]
    g = np.asarray(plan.gammas)
    sol = phema.solve_coefficients(np.repeat(t_full, g.size), np.tile(g, t_full.size),
                                   np.full(target_gammas.size, t_last), target_gammas)
    return (plan.update_after_step, steps[0].step), sol.error
