"""PostHocEMA's settings on every rank: validated locally, then compared across ranks in one collective.

Each rank builds its tracking and snapshot configs (:func:`configs_of`, no collective); then one
all_gather_object of a small record on dist-ema's side group (:func:`agreed_settings`) raises the
same ConfigError on every rank when a rank's settings are invalid or differ, naming each rank's
value and the fix, before anything is written. ``storage_options`` are left out of the comparison:
credentials and endpoints may differ per host and must not travel to other ranks' messages.
"""

from __future__ import annotations

from dist_ema.config import EMAConfig, SnapshotConfig

__all__ = ["agreed_settings", "configs_of", "local_settings"]


def _as_profiles(value: object) -> object:
    """A number is one profile (``sigma_rels=0.05``, as in a config file); a list, tuple or generator a tuple.

    Anything else is passed on as it is, for EMAConfig's check to name the problem.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (value,)
    if value is None or isinstance(value, (str, bytes)):
        return value
    try:
        return tuple(value)  # type: ignore[arg-type]
    except TypeError:
        return value


def configs_of(*, sigma_rels, gammas, update_every, batch_size, include_frozen, params, buffers, update_impl, offload,
             store, snapshot_every, storage_options, storage_dtype, compression, keep, resume, inner_chunk_bytes,
             max_object_bytes, writer, slots, upload_part_bytes, upload_concurrency, when_behind, on_error,
             timeout) -> tuple[EMAConfig, SnapshotConfig | None, bool | str]:
    """This rank's validated settings (local: no collective): the tracking and snapshot configs, and resume."""
    from dist_ema.config import ConfigError, check_resume, inner_chunk_bytes_of

    config = EMAConfig(sigma_rels=_as_profiles(sigma_rels), gammas=_as_profiles(gammas), update_every=update_every,
                       batch_size=batch_size, include_frozen=include_frozen, buffers=buffers, update_impl=update_impl,
                       offload=offload, params=params)
    resume = check_resume(resume)
    if store is None:
        if snapshot_every is not None or resume:
            raise ConfigError("snapshot_every= and resume= need store=URL (a local path or s3://bucket/prefix)")
        return config, None, resume
    # stacklevel: the warning points at the line that built the PostHocEMA
    chunk = inner_chunk_bytes_of(inner_chunk_bytes, max_object_bytes, stacklevel=5)
    snap = SnapshotConfig(url=store, snapshot_every=snapshot_every, storage_options=storage_options,
                          dtype=storage_dtype, compression=compression, keep=keep, inner_chunk_bytes=chunk,
                          writer=writer, slots=slots, upload_part_bytes=upload_part_bytes,
                          upload_concurrency=upload_concurrency, when_behind=when_behind, on_error=on_error,
                          timeout=timeout)
    return config, snap, resume


# the settings every rank must share, by the keyword users spell them with. storage_options are left out:
# credentials and endpoints may differ per host, and they must not travel to other ranks' error messages.
_EMA_FIELDS = ("sigma_rels", "gammas", "update_every", "batch_size", "include_frozen", "buffers", "update_impl",
               "offload", "params")
_SNAPSHOT_FIELDS = {"store": "url", "snapshot_every": "snapshot_every", "storage_dtype": "dtype",
                    "compression": "compression", "keep": "keep", "inner_chunk_bytes": "inner_chunk_bytes",
                    "writer": "writer", "slots": "slots", "upload_part_bytes": "upload_part_bytes",
                    "upload_concurrency": "upload_concurrency", "when_behind": "when_behind", "on_error": "on_error",
                    "timeout": "timeout"}


def _settings_record(config: EMAConfig, snap: SnapshotConfig | None, resume: bool | str) -> dict:
    """The small record one rank sends to compare its settings: {keyword: value}."""
    record = {name: getattr(config, name) for name in _EMA_FIELDS}
    if callable(config.params):  # a callable does not travel: its outcome is compared by the layout check
        record["params"] = "a callable"
    record.update({name: None if snap is None else getattr(snap, attr) for name, attr in _SNAPSHOT_FIELDS.items()})
    record["resume"] = resume
    return record


def _ranks_by_value(values: list) -> str:
    """'rank 0: (0.05, 0.1), rank 1: (0.05, 0.2)'; ranks with the same value grouped ('ranks 1, 2, 3: ...')."""
    groups: list[tuple[object, list[int]]] = []
    for r, v in enumerate(values):
        for g in groups:
            if g[0] == v:
                g[1].append(r)
                break
        else:
            groups.append((v, [r]))
    parts = []
    for v, ranks in groups[:6]:
        who = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks[:8])) + (
            f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")
        parts.append(f"{who}: {v!r}")
    return ", ".join(parts) + (f", and {len(groups) - 6} other values" if len(groups) > 6 else "")


def local_settings(settings) -> tuple[object, BaseException | None]:
    """``settings()`` on this rank: (result, None) or (None, the error), to be exchanged before raising."""
    try:
        return settings(), None
    except Exception as e:  # noqa: BLE001 - raised on every rank by agreed_settings
        return None, e


def agreed_settings(mine: tuple[object, BaseException | None], timeout: object,
                     collective: bool = True) -> tuple[EMAConfig, SnapshotConfig | None, bool | str]:
    """This rank's settings (``mine``, from :func:`local_settings`), checked to be the same on every rank.

    One collective (an all_gather_object of a small record) on dist-ema's side group, so a rank that
    stops responding makes the others fail within ``timeout``. A rank whose own settings are invalid,
    or settings that differ, raise ConfigError on every rank naming each rank's value and the fix.
    Without a process group (or ``collective=False``) this rank's own error is raised as it is.
    """
    from dist_ema.collective import all_gather_object, is_distributed, side_group
    from dist_ema.config import ConfigError, check_timeout

    result, error = mine
    if not (collective and is_distributed()):
        if error is not None:
            raise error
        return result
    try:
        seconds = check_timeout(timeout)
    except ConfigError:
        seconds = SnapshotConfig.timeout  # the error itself travels in the record
    record = (None if error is None else f"{type(error).__name__}: {error}",
              None if result is None else _settings_record(*result))
    everyone = all_gather_object(record, side_group(seconds))
    bad = [(r, err) for r, (err, _) in enumerate(everyone) if err is not None]
    if bad:
        detail = "; ".join(f"rank {r}: {err}" for r, err in bad[:4]) + (
            f"; and {len(bad) - 4} more" if len(bad) > 4 else "")
        exc = ConfigError(f"PostHocEMA settings are invalid on {len(bad)} of {len(everyone)} rank(s): {detail}",
                          failures=dict(bad))
        raise exc from error
    records = [rec for _, rec in everyone]
    differ = [name for name in records[0] if any(rec[name] != records[0][name] for rec in records)]
    if differ:
        lines = "; ".join(f"{name}: {_ranks_by_value([rec[name] for rec in records])}" for name in differ)
        raise ConfigError(
            f"PostHocEMA settings differ across ranks: {lines}. Fix: every rank must construct PostHocEMA with the "
            f"same settings (the same config file and flags on every rank); nothing was written"
        )
    return result
