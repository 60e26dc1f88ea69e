"""Shared benchmark helpers: machine description, interleaved timing, result records, profiles.

Every figure a benchmark reports is a ratio against a baseline measured in the same run.
Variants are timed *interleaved* (round robin: a, b, c, a, b, c, ...) so that a load
change on this shared machine hits all of them alike; a ratio is the median of the
per-round ratios (paired), a time the median over rounds.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20
GiB = 2**30


def machine() -> dict:
    """CPU model, cores, memory, versions and the load average (other jobs share this machine)."""
    import numpy as np
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
    }
    for mod in ("zarr", "s3fs", "moto", "ema_pytorch", "nitrous_ema"):
        info[mod] = _version(mod)
    return info


def _version(mod: str) -> str | None:
    from importlib import metadata

    name = {"ema_pytorch": "ema-pytorch", "nitrous_ema": "nitrous-ema"}.get(mod, mod)
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Time each function once per round, round robin; returns seconds per round per name."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            dt = time.perf_counter() - t0
            if r >= warmup:
                out[name].append(dt)
    return out


def med(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[r] / den[r] (both measured in the same round)."""
    return med([a / b for a, b in zip(num, den) if b > 0])


def spread(xs: list[float]) -> float:
    """Relative half-width of the interquartile range (noise indicator)."""
    if len(xs) < 4:
        return float("nan")
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / 2 / med(xs)


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)


@dataclass
class Goal:
    goal: str
    value: str
    met: bool | None  # None: informational
    why: str = ""


@dataclass
class Result:
    name: str
    title: str
    config: dict = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    def to_json(self) -> dict:
        return {
            "name": self.name, "title": self.title, "config": self.config, "seconds": round(self.seconds, 1),
            "tables": [t.__dict__ for t in self.tables], "goals": [g.__dict__ for g in self.goals],
            "notes": self.notes, "data": self.data, "error": self.error,
        }


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.2f}"


def fmt_x(r: float) -> str:
    return f"{r:.2f}x"


def profile_rows(prof, rows: int = 6, always: tuple[str, ...] = ()) -> list[str]:
    """Top ops of a torch.profiler run by self CPU time, as 'name share%' (plus the ops named in ``always``)."""
    avgs = list(prof.key_averages())
    total = sum(a.self_cpu_time_total for a in avgs) or 1.0
    top = sorted(avgs, key=lambda a: -a.self_cpu_time_total)
    picked = top[:rows] + [a for a in top[rows:] if any(k in a.key for k in always)]
    return [f"{a.key} {100 * a.self_cpu_time_total / total:.1f}%" for a in picked]


def profile_top(fn: Callable[[], object], reps: int = 3, rows: int = 6) -> list[str]:
    """torch.profiler self-CPU-time shares of ``fn`` (the evidence when a goal is missed)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
    return profile_rows(prof, rows)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (Linux /proc), None if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def env_for_children(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_json_child(args: list[str], timeout: float = 600, env: dict | None = None) -> dict:
    """Run a child process that prints one JSON object as its last stdout line."""
    res = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env or env_for_children(),
                         cwd=str(ROOT))
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])}... exit {res.returncode}:\n{res.stderr[-3000:]}")
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"no JSON from {' '.join(args[:4])}...:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return json.loads(lines[-1])
