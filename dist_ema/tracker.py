"""PostHocEMA: power-function EMAs of each rank's own parameter shards.

The tracker holds, per tracked profile, ONE flat fp32 buffer on the shards' device;
every shard piece's EMA is a view into it, in the order of ``layout.pieces`` with the
pieces this rank owns first. So an update is one ``torch._foreach_lerp_`` per profile
over all pieces, and a snapshot of a profile is one contiguous copy of the owned
prefix of its buffer.

Time: ``t`` counts optimizer steps (or samples when ``batch_size`` is given). An
update at time t with t_delta since the previous update uses
beta = (1 - t_delta / t)^(gamma + 1), exact for any update interval.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np
import torch

from dist_ema import phema
from dist_ema.collective import is_distributed
from dist_ema.config import (
    DEFAULT_CONCURRENCY,
    DEFAULT_INNER_BYTES,
    DEFAULT_PART_BYTES,
    Buffers,
    Compression,
    EMAConfig,
    OnError,
    Params,
    SnapshotConfig,
    StorageDtype,
    UpdateImpl,
    WhenBehind,
    Writer,
)
from dist_ema.errors import ConfigError, StateDictError
from dist_ema.settings import agreed_settings, configs_of, local_settings
from dist_ema.sharding.base import ShardLayout, ShardPiece
from dist_ema.sharding.parts import as_model
from dist_ema.sharding.watch import ModelChangedError, ModelWatch, describe_change, param_table
from dist_ema.step_counter import OptimizerSteps
from dist_ema.store.layout import flat_blocks

__all__ = ["EMAConfig", "ModelChangedError", "PostHocEMA"]

log = logging.getLogger("dist_ema")


@dataclass
class _Profile:
    sigma_rel: float
    gamma: float
    flat: torch.Tensor  # fp32, [local elements] on the shards' device
    views: list[torch.Tensor] = field(default_factory=list)  # one per piece, into flat


@dataclass
class Clock:
    """The EMA's time, one record with one owner (the tracker); the snapshot side only reads it.

    step: optimizer steps seen (applied ones); t: time of the EMA state (in the config's unit,
    steps or samples); t_updated: time of the last EMA update; updates: EMA updates so far.
    """

    step: int = 0
    t: float = 0.0
    t_updated: float = 0.0
    updates: int = 0

    @staticmethod
    def of_snapshot(meta: dict) -> Clock:
        """The clock stored with a snapshot (its metadata document)."""
        return Clock(int(meta["step"]), float(meta["t_now"]), float(meta["t"]), int(meta["updates"]))


def _clock_field(name: str, doc: str) -> property:
    return property(lambda self: getattr(self.clock, name), lambda self, v: setattr(self.clock, name, v), doc=doc)


class PostHocEMA:
    """Power-function EMAs of a (sharded) model, kept shard-local on every rank.

    Example:
        >>> ema = PostHocEMA(model, sigma_rels=(0.05, 0.10))
        >>> for batch in data:
        ...     loss(model, batch).backward(); optimizer.step(); optimizer.zero_grad()
        ...     ema.update()

    ``model_or_engine`` is a module wrapped with FSDP2 ``fully_shard``, FSDP1, DDP, a
    plain module, or a DeepSpeed engine (ZeRO 1/2/3); the engine is detected.
    All ranks of the process group must construct it together, with the same settings: one
    collective compares every rank's settings (a mismatch raises ConfigError on every rank,
    naming the setting and each rank's value, before anything is written), another checks
    that the shards cover every parameter exactly once.

    The model may change under the EMA: before every update (and swap) a cheap check sees
    storages that moved (``model.double()``, ``model.to(dtype or device)``, ``param.data = ...``,
    a checkpoint load with ``assign=True``) and re-lists the views (logged; ``ema.relisted``
    counts it); a changed set of tracked parameters (a new or replaced submodule, a layer
    unfrozen with ``include_frozen=False``) raises :class:`ModelChangedError` and leaves the EMA
    as it was.

    Process-wide state: to tell an ``update()`` after a skipped optimizer step, the first
    PostHocEMA of a process registers a *global* optimizer step post hook
    (``torch.optim.optimizer.register_optimizer_step_post_hook``) that counts the steps of
    every torch optimizer in the process (one integer increment per step). It is removed
    when the last PostHocEMA is closed (``close()``, leaving a ``with`` block, or garbage
    collection); an ``update()`` after ``close()`` takes it up again. The model check also
    installs, once per process and for good, torch's global module / parameter / buffer
    registration hooks (one integer increment per registration), so that it compares the module
    tree only after something was registered.

    Args:
        sigma_rels / gammas / update_every / batch_size / include_frozen / buffers / update_impl / offload: what to
            track, see :class:`EMAConfig` (defaults: sigma_rels (0.05, 0.10), every step, time
            in steps, frozen parameters tracked, buffers copied into snapshots). A single number
            (``sigma_rels=0.05``) is one profile.
        params: track only these parameters (and keep only these buffers): glob patterns on the clean
            names (``"*.lora_*"`` or a list) or a predicate ``lambda name, p: ...``; None tracks all. See
            :mod:`dist_ema.sharding.select`.
        store: snapshot store URL (local path, ``file://``, ``s3://bucket/prefix``, any fsspec
            URL); None keeps the EMA in memory only.
        snapshot_every, storage_options, storage_dtype, compression, keep, inner_chunk_bytes,
            writer, slots, upload_part_bytes, upload_concurrency, when_behind, on_error, timeout: how
            snapshots are written, see
            :class:`dist_ema.config.SnapshotConfig`.
        max_object_bytes: the old name of ``inner_chunk_bytes`` (DeprecationWarning).
        resume: restore the EMA from the newest committed snapshot in ``store`` (any world
            size); a store with snapshots is refused without it, so nothing is overwritten.
            ``resume="takeover"`` also takes the store over from another job that owns it
            (see docs/commit-protocol.md). Only True, False and "takeover" are accepted.
        layout: a hand-made :class:`~dist_ema.sharding.base.ShardLayout` (tests, benchmarks); without a
            store, construction then runs no collective. Its ``after_load`` and ``step_applied`` are
            used as they are (an engine whose working weights are full on every rank needs an
            ``after_load`` that re-syncs them, e.g. ``sharding.resync.make_replicated_resync``).
    """

    def __init__(
        self,
        model_or_engine: object,
        sigma_rels: Sequence[float] | None = None,
        *,
        gammas: Sequence[float] | None = None,
        update_every: int = 1,
        batch_size: int | None = None,
        include_frozen: bool = True,
        params: Params = None,
        buffers: Buffers = "copy",
        update_impl: UpdateImpl = "auto",
        offload: bool = False,
        store: str | None = None,
        snapshot_every: int | None = None,
        storage_options: dict | None = None,
        storage_dtype: StorageDtype = "float32",
        compression: Compression | None = None,
        keep: int | None = None,
        resume: bool = False,
        inner_chunk_bytes: int = DEFAULT_INNER_BYTES,
        writer: Writer = "process",
        slots: int = 2,
        upload_part_bytes: int = DEFAULT_PART_BYTES,
        upload_concurrency: int = DEFAULT_CONCURRENCY,
        when_behind: WhenBehind = "block",
        on_error: OnError = "raise",
        timeout: float = 300.0,
        layout: ShardLayout | None = None,
        max_object_bytes: int | None = None,
    ) -> None:
        # every rank checks its settings, then ONE collective compares them (and carries any rank's bad input)
        # before anything is written: a mismatch would commit wrong snapshots or put collectives out of step
        def settings() -> tuple[EMAConfig, SnapshotConfig | None, bool | str]:
            return configs_of(sigma_rels=sigma_rels, gammas=gammas, update_every=update_every, batch_size=batch_size,
                            include_frozen=include_frozen, params=params, buffers=buffers, update_impl=update_impl,
                            offload=offload,
                            store=store,
                            snapshot_every=snapshot_every, storage_options=storage_options,
                            storage_dtype=storage_dtype, compression=compression, keep=keep, resume=resume,
                            inner_chunk_bytes=inner_chunk_bytes, max_object_bytes=max_object_bytes,
                            writer=writer, slots=slots, upload_part_bytes=upload_part_bytes,
                            upload_concurrency=upload_concurrency, when_behind=when_behind, on_error=on_error,
                            timeout=timeout)

        mine = local_settings(settings)
        if mine[1] is not None and not is_distributed():
            raise mine[1]  # one process: bad input fails before anything else
        model_or_engine = as_model(model_or_engine)  # pipeline stages: a list of modules
        self.model = model_or_engine
        if layout is None:
            from dist_ema.sharding.checks import verify_layout
            from dist_ema.sharding.select import make_selected_layout

            # params=: the chosen parameters and buffers; the layout check compares the ranks' choices
            layout = make_selected_layout(model_or_engine, include_frozen, params)
            # on the default group: a rank that died before start-up fails the others at once there, where
            # creating the side group would wait ``timeout`` seconds for it
            layout = verify_layout(layout)
            collective = True
        else:  # a hand-made layout without a store may be rank-local (one rank's reference EMA)
            collective = store is not None
            if params is not None and mine[1] is None:
                from dist_ema.sharding.select import select_local

                layout = select_local(layout, params, _unwrap_module(model_or_engine))
        self.config, self.store_config, resume = agreed_settings(mine, timeout, collective)
        self.layout = layout
        # tied parameters (head.weight = emb.weight): the engines list each once; the other names
        # are recorded so full state dicts and exported files load with a strict load_state_dict
        self.ties = _tied_names(model_or_engine, layout)
        self._set_pieces(layout.pieces)
        # the model may move away from the views (model.double(), param.data = ..., a new head, a load with
        # assign=True): checked before every update, see _follow_model
        self._watch = ModelWatch(model_or_engine, layout.engine, set(layout.params), include_frozen)
        self.relisted = 0  # times the views were re-listed after the model's storages moved
        self._stale = False  # set by a model checkpoint load: re-list then (engines without a storage watch)
        module = _unwrap_module(model_or_engine)
        if isinstance(module, torch.nn.Module):
            module.register_load_state_dict_post_hook(self._on_model_load)
        self.profiles = [self._new_profile(s, g) for s, g in zip(self.config.sigma_rels, self.config.gammas)]
        self._host = None  # offload=True: the host update (dist_ema.offload.HostUpdate), made with the plan
        self._build_update_plan()  # staging buffers now, not in the first update (which only compiles)
        self._optimizer_steps = OptimizerSteps()  # the process-wide optimizer step count (class docstring)
        self.clock = Clock()  # the EMA's time: owned here, read by the snapshot side
        self.skipped_steps = 0  # update() calls after which no weight had changed (AMP overflow, ...)
        self._update_calls = 0
        self._warned_skips = False
        self._odd_skips = 0
        self.last_synthesis_error: float | None = None  # of the latest synthesized profile (swapped())
        self.switches = 0  # switch() calls: times the EMA was written into the training weights
        self.snapshots = None
        if self.store_config is not None:
            from dist_ema.snapshot import SnapshotManager

            self.snapshots = SnapshotManager(self, self.store_config, resume=resume)
            if self.snapshots.resumed is not None:
                self._restore(self.snapshots.resumed)
        self._wrote_at = _versions(self.profiles)  # see _refuse_kept_live_dict

    @torch.no_grad()
    def _restore(self, point) -> None:
        """Load a committed snapshot (any layout) into the EMA and take its clock. Collective.

        ``point``: the snapshot manager's ``ResumePoint`` (the snapshot, checked against this EMA,
        and each profile's array in it). Every rank reads only its own pieces.
        """
        from dist_ema.collective import run_and_check
        from dist_ema.store.fs import StoreError

        def load() -> None:
            for prof, k in zip(self.profiles, point.profiles):
                vals = point.reader.read_pieces(point.snap, k, self.pieces, self.offsets)[0]
                prof.flat.copy_(torch.from_numpy(vals))

        try:
            run_and_check(load, f"resuming from {point.reader.url}", self.snapshots.group, StoreError)
        except BaseException:
            self.snapshots.abandon()  # the writer and the store's claim are given up with the error
            raise
        self.clock = Clock.of_snapshot(point.snap.meta)
        if self.snapshots.rank == 0:
            log.info("dist-ema: resumed EMA from snapshot step %d (t=%g %s) of %s", point.snap.step, point.snap.t,
                     point.snap.unit, point.reader.url)

    # ------------------------------------------------------------------ layout

    def _set_pieces(self, pieces: Sequence[ShardPiece]) -> None:
        self.pieces: list[ShardPiece] = [pieces[i] for i in _piece_order(pieces)]
        self._update_plan = None  # built at the next update, over these sources
        devices = {p.source.device for p in self.pieces}
        if len(devices) > 1:
            raise ConfigError(
                f"shards live on several devices {sorted(map(str, devices))}; dist-ema keeps one EMA buffer per rank "
                f"on the shards' device: move the model's shards to one device"
            )
        self.device = devices.pop() if devices else torch.device("cpu")
        # where the EMA buffers live: beside the shards, or in host memory (offload=True)
        self.buffer_device = torch.device("cpu") if self.config.offload else self.device
        self.offsets = np.cumsum([0] + [p.numel for p in self.pieces]).tolist()
        self.owned_numel = sum(p.numel for p in self.pieces if p.owner)

    def _new_profile(self, sigma_rel: float, gamma: float) -> _Profile:
        if self.config.offload:
            from dist_ema.offload import host_buffer

            flat = host_buffer(self.offsets[-1], torch.float32, self.device)
        else:
            flat = torch.empty(self.offsets[-1], dtype=torch.float32, device=self.device)
        prof = _Profile(sigma_rel, gamma, flat)
        self._bind_views(prof)
        # at t = 0 the EMA is the initial parameter (overwritten by the first update, beta = 0)
        with torch.no_grad():
            for v, p in zip(prof.views, self.pieces):
                v.copy_(p.source)
        return prof

    def _bind_views(self, prof: _Profile) -> None:
        prof.views = [prof.flat[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def _on_model_load(self, module: torch.nn.Module, incompatible_keys: object) -> None:
        self._stale = True

    def refresh_views(self) -> None:
        """Re-list the shard views after the model's storages were replaced; the EMA values are kept.

        ``update()`` (and the swaps) do it by themselves when the model moved (``model.double()``,
        ``model.to(dtype or device)``, ``param.data = ...``, a checkpoint load with ``assign=True``);
        call it after anything else that swaps parameter storages behind the model's back.
        The re-listed parameters are logged (old -> new dtype and device).
        """
        if self.layout.refresh is None:
            return
        self.wait_update()
        new = self.layout.refresh()
        old_pieces, old_device = self.pieces, self.device
        keys = {(*p.key, p.owner) for p in old_pieces}
        new_keys = {(*p.key, p.owner) for p in new.pieces}
        if keys != new_keys or set(new.params) != set(self.layout.params):
            changed = sorted({k[0] for k in keys ^ new_keys} | (set(new.params) ^ set(self.layout.params)))
            raise ModelChangedError(
                f"the model's parameters or their sharding changed since the EMA was created (other shard pieces "
                f"of {changed[:8]}{' and more' if len(changed) > 8 else ''} after re-listing them); the EMA is "
                f"unchanged (step {self.step}). {_NEW_EMA_FIX}"
            )
        devices = {p.source.device for p in new.pieces}
        if len(devices) > 1 or any(d.type == "meta" for d in devices):
            raise ModelChangedError(
                f"the model's shards moved to {sorted(map(str, devices))}; the EMA keeps one buffer per profile on "
                f"the shards' device (a real one, not meta) and stays where it is, unchanged (step {self.step}). "
                f"Fix: move the whole model to one device before the next update"
            )
        self.layout = new
        self._set_pieces(new.pieces)
        if self.device != old_device and not self.config.offload:  # model.to(device): the EMA follows its shards
            for prof in self.profiles:
                prof.flat = prof.flat.to(self.device)
                self._bind_views(prof)
            self._wrote_at = _versions(self.profiles)
        self._build_update_plan()
        self._watch = ModelWatch(self.model, new.engine, set(new.params), self.config.include_frozen)
        self._stale = False
        self.relisted += 1
        _log_relisted(old_pieces, self.pieces)

    def _follow_model(self) -> None:
        """Before the EMA reads its sources: follow moved storages, refuse a changed set of tracked parameters.

        Cheap when nothing changed (``ModelWatch.changed``: a few C-level passes, no tensor operation).
        A refusal leaves the EMA and its clock as they were: undoing the change lets it go on.
        """
        if not self._stale and not self._watch.changed():
            return
        watch = self._watch
        if watch.module is not None:
            change = describe_change(watch.table, param_table(watch.module), set(self.layout.params),
                                     self.config.include_frozen, self.layout.selection, watch.module)
            if change:
                what = "; ".join(f"{kind}: {', '.join(names[:8])}{' and more' if len(names) > 8 else ''}"
                                 for kind, names in change.items())
                hint = (" (include_frozen=False tracks the parameters that were trainable when the EMA was "
                        "created)") if "newly trainable" in change else ""
                raise ModelChangedError(
                    f"the model's tracked parameters changed since the EMA was created: {what}{hint}. The EMA "
                    f"cannot take them in (its profiles would average old and new weights); it is unchanged "
                    f"(step {self.step}). {_NEW_EMA_FIX}"
                )
        moved = watch.storages_moved()
        if moved and self.layout.refresh is None:
            raise ModelChangedError(
                f"the model's parameter storages moved, and this EMA's layout (made by hand, without refresh) "
                f"cannot re-list its views; the EMA is unchanged (step {self.step}). {_NEW_EMA_FIX}"
            )
        if moved or (self._stale and self.layout.refresh is not None):
            self.refresh_views()
            return
        self._stale = False
        # a buffer replaced, a tracked parameter frozen, or a change outside the tracked parameters
        if self.layout.refresh is not None:
            from dist_ema.sharding.replicated import persistent_buffers
            from dist_ema.sharding.select import selected_buffers

            self.layout.buffers = selected_buffers(self.layout, persistent_buffers(_unwrap_module(self.model)))
        self._watch = ModelWatch(self.model, self.layout.engine, set(self.layout.params), self.config.include_frozen)

    # ------------------------------------------------------------------ properties

    @property
    def sigma_rels(self) -> tuple[float, ...]:
        return tuple(p.sigma_rel for p in self.profiles)

    @property
    def gammas(self) -> tuple[float, ...]:
        return tuple(p.gamma for p in self.profiles)

    def profile(self, sigma_rel: float | None = None, gamma: float | None = None) -> _Profile:
        """The tracked profile with this sigma_rel (or gamma); ValueError naming the tracked ones."""
        if (sigma_rel is None) == (gamma is None):
            raise ConfigError("give exactly one of sigma_rel or gamma")
        # one rule for "the same profile": phema.same_gamma
        k = phema.find_gamma(self.gammas, phema.sigma_rel_to_gamma(sigma_rel) if sigma_rel is not None else gamma)
        if k is not None:
            return self.profiles[k]
        if sigma_rel is not None:
            raise ConfigError(
                f"sigma_rel={sigma_rel} is not tracked (tracked: {list(self.sigma_rels)}); "
                f"use ema.swapped(sigma_rel=...) or synthesize() for other profiles"
            )
        raise ConfigError(f"gamma={gamma} is not tracked (tracked: {list(self.gammas)})")

    # ------------------------------------------------------------------ update

    @torch.no_grad()
    def update(self) -> bool:
        """Account for one optimizer step; every ``update_every`` steps, update the EMAs.

        Call once after each optimizer step. Steps the engine did not apply
        (DeepSpeed fp16 overflow, gradient-accumulation micro-steps) are skipped, and so is
        a call with no torch optimizer step since the previous one (``torch.amp.GradScaler``
        skipped it on inf gradients, or update() runs twice per step), told by the
        process-wide optimizer step count (see the class docstring).
        No host-device synchronization, no allocation for fp32 shards.
        Returns True when the EMAs were updated.
        """
        self._update_calls += 1
        if self.layout.step_applied is not None and not self.layout.step_applied():
            self._skip("the engine skipped the optimizer step (fp16 overflow or a gradient-accumulation micro-step)",
                       expected=True)
            return False
        seen = self._optimizer_steps.seen()  # closed, and updated again: counting again
        if not self._optimizer_steps.stepped(seen):
            # no torch optimizer step since the previous update: torch.amp.GradScaler skipped it (inf
            # gradients), or update() runs more often than the optimizer steps. The weights did not change.
            self._skip("no optimizer step since the previous update() (GradScaler skipped it, or update() "
                       "is called more than once per step)")
            return False
        self._follow_model()  # before anything moves: a refusal leaves the EMA and its clock as they were
        self._optimizer_steps.updated(seen)
        self.step += 1
        # each step advances time by its own samples: a resume may change the (global) batch size
        self.t += float(self.config.batch_size or 1)
        if self.step % self.config.update_every != 0:
            return False
        t_delta = self.t - self._t_updated
        if self.snapshots is not None:  # on a GPU: after the copy of a staged snapshot, on the device
            self.snapshots.before_update()
        self._apply(self.t, t_delta)
        self._wrote_at = _versions(self.profiles)
        self._t_updated = self.t
        self.updates += 1
        if self.snapshots is not None:  # the snapshot side owns its schedule
            self.snapshots.after_update()
        return True

    def _skip(self, why: str, expected: bool = False) -> None:
        """Count a step that changed no weight: time does not advance, the EMA is not updated."""
        self.skipped_steps += 1
        self._odd_skips += 0 if expected else 1
        calls = self._update_calls
        if not self._warned_skips and calls >= 20 and self._odd_skips * 2 >= calls:
            self._warned_skips = True
            log.warning("dist-ema: %d of %d update() calls changed no weight and were counted as skipped steps "
                        "(last reason: %s); call ema.update() once, right after each optimizer step",
                        self._odd_skips, calls, why)
        else:
            log.debug("dist-ema: update() skipped: %s", why)

    def snapshot(self) -> str | None:
        """Write a snapshot of every tracked profile now (collective: call on every rank).

        Returns the snapshot's id, or None if one was already taken at this step.
        Written in the background; committed once every rank finished writing.
        """
        if self.snapshots is None:
            raise ConfigError("snapshot() needs a store: PostHocEMA(..., store='runs/x/snapshots')")
        return self.snapshots.snapshot()

    def flush(self) -> None:
        """Wait until every snapshot taken so far is committed, keep the writer (collective).

        Call before saving a training checkpoint, so that the checkpoint and the store agree.
        """
        if self.snapshots is not None:
            self.snapshots.flush()

    def close(self, final_snapshot: bool = True) -> None:
        """Flush pending snapshots, commit them and stop the writer (collective; idempotent).

        With a store and ``snapshot_every``, the updates after the newest snapshot are kept in a
        final snapshot first (logged once on rank 0), unless the EMA has not moved since;
        ``final_snapshot=False`` skips it. Example: ``snapshot_every=10`` and 65 updates give
        snapshots at steps 10, 20, ..., 60 and 65.
        """
        self.wait_update()
        if self.snapshots is not None:
            self.snapshots.close(final_snapshot=final_snapshot)
        if self._host is not None:  # its worker thread stops; an update() after close() starts it again
            self._host.close()
        self._optimizer_steps.release()  # the last EMA closed removes the optimizer hook

    def __enter__(self) -> PostHocEMA:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self.snapshots is not None:
            # an exception is propagating (Ctrl-C, an error maybe on this rank only): one process commits what
            # it took, as at exit; several ranks take no collective, name what is lost and stop the writer
            self.snapshots.after_error(exc_type.__name__)
        if exc_type is not None:
            self._optimizer_steps.release()

    def _build_update_plan(self) -> None:
        """The fused update over the current sources (built when the pieces change; compiles at its first call).

        With offload=True: the host update (:class:`~dist_ema.offload.HostUpdate`: host mirrors of the
        sources, a worker thread), replacing the previous one after its update in flight finished.
        """
        self._update_plan = None
        if self.config.offload:
            from dist_ema.offload import HostUpdate

            if self._host is not None:
                self._host.close()
            self._host = HostUpdate([prof.views for prof in self.profiles], [p.source for p in self.pieces],
                                    self.device, self.config.update_impl)
            return
        if self.config.update_impl == "foreach" or not self.pieces:
            return
        from dist_ema.kernels import DEFAULT_MIN_NUMEL, FusedUpdate

        fused = self.config.update_impl == "fused"
        self._update_plan = FusedUpdate([prof.views for prof in self.profiles], [p.source for p in self.pieces],
                                        min_numel=1 if fused else DEFAULT_MIN_NUMEL)

    def _apply(self, t: float, t_delta: float) -> None:
        weights = [1.0 - phema.power_beta(prof.gamma, t, t_delta) for prof in self.profiles]  # host floats: no sync
        if self._host is not None:  # offload=True: staged to host, applied by the worker thread
            self._host.submit(weights)
            return
        if self.config.update_impl != "foreach" and self.pieces:
            if self._update_plan is None:
                self._build_update_plan()
            self._update_plan(weights)
            return
        from dist_ema.kernels import foreach_update

        foreach_update([prof.views for prof in self.profiles], [p.source for p in self.pieces], weights)

    @property
    def update_waits(self) -> int:
        """``offload=True``: the updates that waited for the previous one to finish (back-pressure); 0 otherwise."""
        return self._host.waits if self._host is not None else 0

    def wait_update(self) -> None:
        """Wait until the update in flight finished (``offload=True``; a no-op otherwise).

        Everything that reads or writes the EMA buffers calls it first (snapshots, swaps, state dicts,
        synthesis); call it before reading ``ema.profiles`` yourself. Re-raises an error of that update.
        """
        host = self._host
        if host is not None and host.wait():
            self._wrote_at = _versions(self.profiles)  # the worker wrote after update() returned

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Resumable state; the EMA reshards like the model's state under torch.distributed.checkpoint.

        ``PostHocEMA`` follows DCP's ``Stateful`` protocol, so it goes into a DCP state dict as
        it is, next to the model and optimizer; DCP calls this method, loads the saved values
        in place (at any world size) and then calls :meth:`load_state_dict`::

            >>> dcp.save({"model": model_sd, "optim": optim_sd, "ema": ema}, checkpoint_id=path)
            >>> dcp.load({"model": model_sd, "optim": optim_sd, "ema": ema}, checkpoint_id=path)

        Layout (format ``dist_ema.tracker/3``): ``{"dist_ema": {step, t, ...},
        "sigma_rel_<s>": {fqn: tensor, ...}, ...}``, one entry per tracked profile keyed by the
        model's parameter names, each tensor with the parameter's global shape: under FSDP2 a
        ``DTensor`` with the parameter's mesh and placements around this rank's EMA shard;
        under the other engines a tensor that lists this rank's flat ranges of the parameter
        as rectangular chunks for DCP. Both reshard through DCP (another world size, another
        engine). The tensors are views of the live EMA buffers: nothing is copied or gathered.
        So a dict kept in memory moves on with the EMA while its clock does not: for an in-memory
        rollback keep ``copy.deepcopy(ema.state_dict())``; :meth:`load_state_dict` refuses a kept
        live dict whose clock is older than the EMA's.

        ``torch.save(ema.state_dict())`` per rank works too (reloaded at the same sharding).
        """
        from dist_ema import checkpoint

        self.wait_update()
        return checkpoint.state_dict(self.clock, self.layout, self.pieces, self.profiles, unit=self.config.unit,
                                     skipped_steps=self.skipped_steps)

    def per_rank_state_dict(self) -> dict:
        """The previous format (``dist_ema.tracker/2``): each rank's buffers under a key of its own.

        Only for loading a checkpoint written in that format (same world size and wrapping),
        e.g. ``sd = {"ema": ema.per_rank_state_dict()}; dcp.load(sd, ...); ema.load_state_dict(sd["ema"])``.
        New checkpoints use :meth:`state_dict`, which reshards.
        """
        from dist_ema import checkpoint

        self.wait_update()
        return checkpoint.per_rank_state_dict(self.clock, self.pieces, self.profiles, unit=self.config.unit)

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (collective: every rank calls it).

        After ``dcp.load`` (any world size; the values were loaded in place) or with a
        state dict this rank saved with ``torch.save`` (same sharding). Restores the EMA,
        the clock (step, time, updates) and the profiles' schedule: the next ``update()``
        continues exactly. With a store attached, snapshots after the restored step (an
        older checkpoint) are retired. The previous per-rank format (``dist_ema.tracker/2``)
        loads at the same sharding.
        """
        from dist_ema import checkpoint
        from dist_ema.collective import is_distributed, run_and_check

        fmt, head = checkpoint.check_state(state, self.gammas, self.config.unit)
        self.wait_update()

        def check_and_fill() -> None:
            now = _versions(self.profiles)
            checkpoint.refuse_kept_live_dict(state, head, fmt, self.profiles, step=self.step, updates=self.updates,
                                             written_since=now is None or now != self._wrote_at)
            with torch.no_grad():
                for dst, src in checkpoint.loaded_values(state, fmt, self.pieces, self.profiles):
                    dst.copy_(src)
            self._wrote_at = _versions(self.profiles)

        if is_distributed():  # a rank whose part does not fit fails every rank, before anything collective
            run_and_check(check_and_fill, "loading the EMA state dict", None, StateDictError)
        else:
            check_and_fill()
        self.step, self.t = int(head["step"]), float(head["t"])
        self._t_updated, self.updates = float(head["t_updated"]), int(head["updates"])
        self.skipped_steps = int(head.get("skipped_steps", self.skipped_steps))
        if self.snapshots is not None:  # snapshots after a restored (older) checkpoint are retired
            self.snapshots.restored(self.step, self._t_updated)

    # ------------------------------------------------------------------ gather

    @torch.no_grad()
    def full_state_dict(self, sigma_rel: float | None = None, gamma: float | None = None) -> dict[str, torch.Tensor]:
        """Full fp32 tensors of one tracked profile, gathered on rank 0 ({} on other ranks).

        Keys are the model's parameter names (plus buffers with ``buffers="copy"``), shapes
        the model's; loadable with ``model.load_state_dict`` into an unsharded model.
        For small models, tests and debugging: it materializes the whole model on rank 0.
        """
        prof = self.profile(sigma_rel=sigma_rel, gamma=gamma)
        self.wait_update()
        mine = [
            (p.fqn, p.flat_start, prof.views[i].detach().cpu().clone(), p.box)
            for i, p in enumerate(self.pieces)
            if p.owner
        ]
        from dist_ema.collective import gather_to_rank0

        staged = self.layout.all_params is not None and self.config.buffers == "copy"  # pipeline stages
        bufs = {k: b.detach().cpu().clone() for k, b in self.layout.buffers.items()} if staged else {}
        gathered = gather_to_rank0((mine, bufs), None)  # ownership is world-wide (HSDP replicas own nothing)
        if gathered is None:
            return {}
        out: dict[str, torch.Tensor] = {}
        for fqn, (shape, _dtype) in self.layout.global_params.items():
            out[fqn] = torch.empty(math.prod(shape), dtype=torch.float32)
        for part, _ in gathered:
            for fqn, start, values, box in part:
                _place(out[fqn], self.layout.global_params[fqn][0], start, values, box)
        out = {k: v.view(self.layout.global_params[k][0]) for k, v in out.items()}
        out.update({alias: out[name] for alias, name in self.ties.items()})
        if self.config.buffers == "copy":
            for _, theirs in reversed(gathered):  # every stage's buffers; the lowest rank's win
                out.update(theirs)
            out.update({k: b.detach().cpu().clone() for k, b in self.layout.buffers.items()})
        return out

    # ------------------------------------------------------------------ swap (dist_ema.swap)

    def synthesized_shards(self, sigma_rel: float | None = None, gamma: float | None = None) -> torch.Tensor:
        """This rank's shards of the EMA for any profile at the current time, as one flat fp32 tensor.

        Combines every snapshot taken so far (pending ones are committed first: a flush) with the
        live EMA state (the newest "snapshot", at the current time) using the paper's least-squares
        coefficients, solved on rank 0. Each rank reads only its own pieces: no gathers. Collective.
        See :func:`dist_ema.swap.synthesized_shards`.
        """
        self._follow_model()
        return self._synthesized(sigma_rel, gamma)[0]

    def _synthesized(self, sigma_rel: float | None, gamma: float | None) -> tuple[torch.Tensor, float | None]:
        """(this rank's flat EMA for the profile, its reconstruction error: None for a tracked profile)."""
        from dist_ema import swap

        self.wait_update()
        out, error = swap.synthesized_shards(self.clock, self.profiles, self.pieces, self.snapshots,
                                             sigma_rel=sigma_rel, gamma=gamma)
        if error is not None:  # a synthesized profile (a tracked one is used as it is)
            self.last_synthesis_error = error
        return out, error

    def swapped(self, sigma_rel: float | None = None, *, gamma: float | None = None) -> AbstractContextManager[None]:
        """Load the EMA for any sigma_rel at the current time into the live (sharded) model.

        Tracked profiles are used as they are; others are synthesized from every snapshot taken
        so far (committed first) plus the live EMA state (``ema.last_synthesis_error`` holds the profile's
        reconstruction error). The training weights (and fp32 masters) are restored exactly
        on exit. Collective: call on every rank. See :mod:`dist_ema.swap`.

        Example:
            >>> with ema.swapped(sigma_rel=0.15):
            ...     val_loss = evaluate(model)
        """
        from dist_ema import swap

        self._follow_model()  # the swap writes into the sources: the model's current ones

        def values() -> list[torch.Tensor]:  # on entering
            flat = self._synthesized(sigma_rel, gamma)[0]
            return [flat[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]

        return swap.swapped_values(self.pieces, values, self.layout.after_load)

    def switch(self, sigma_rel: float | None = None, *, gamma: float | None = None) -> float | None:
        """Write the EMA for ``sigma_rel`` into the training weights for good ("Switch EMA", arXiv 2402.09240).

        A tracked profile is written as it is; another is synthesized at the current time from every
        snapshot taken so far (committed first) and the live EMA state, as in :meth:`swapped`. The values
        go into each shard and, where the engine keeps them, its working copy and fp32 master (as a swap
        does, without the restore), and the engine re-syncs its working weights (the layout's
        ``after_load``). The optimizer state (moments, step counts) is left as it is, and the tracked EMAs
        go on from where they are: the next ``update()`` averages the switched weights into them.
        Collective: call on every rank, right after an optimizer step (before the next forward).
        Returns the synthesized profile's reconstruction error (None for a tracked profile); logged on rank 0.

        Example:
            >>> if step % 1000 == 0:
            ...     ema.switch(sigma_rel=0.10)
        """
        from dist_ema import swap
        from dist_ema.collective import rank

        self._follow_model()  # writes into the model's current sources
        flat, error = self._synthesized(sigma_rel, gamma)  # a copy of a tracked profile
        swap.write_into_pieces(self.pieces, [flat[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])])
        if self.layout.after_load is not None:
            self.layout.after_load()
        self.switches += 1
        what = f"sigma_rel={sigma_rel:g}" if sigma_rel is not None else f"gamma={gamma:g}"
        if rank() == 0:
            log.info("dist-ema: switched the training weights to the EMA %s (%s) at step %d (t=%g); the optimizer "
                     "state and the tracked EMAs go on from here", what,
                     "tracked" if error is None else f"synthesized, reconstruction error {error:.3g}", self.step,
                     self.t)
        return error

    def tracked_swapped(self, sigma_rel: float) -> AbstractContextManager[None]:
        """Load a *tracked* profile into the live model, restore the training weights after."""
        from dist_ema import swap

        self._follow_model()
        self.wait_update()
        return swap.swapped_values(self.pieces, self.profile(sigma_rel=sigma_rel).views, self.layout.after_load)


# the clock's fields, read and written through the one record (ema.step is ema.clock.step)
PostHocEMA.step = _clock_field("step", "optimizer steps seen (applied ones)")  # type: ignore[assignment]
PostHocEMA.t = _clock_field("t", "time of the EMA state, in the config's unit")  # type: ignore[assignment]
PostHocEMA._t_updated = _clock_field("t_updated", "time of the last EMA update")  # type: ignore[assignment]
PostHocEMA.updates = _clock_field("updates", "EMA updates so far")  # type: ignore[assignment]


_NEW_EMA_FIX = (
    "Fix: create a new PostHocEMA for the changed model and resume it (PostHocEMA(model, ..., store=url, "
    "resume=True) or ema.load_state_dict(state)), or undo the change"
)


def _versions(profiles: Sequence[_Profile]) -> list[int] | None:
    """The in-place write counters of the EMA buffers (None for inference-mode tensors, which have none)."""
    try:
        return [prof.flat._version for prof in profiles]
    except RuntimeError:
        return None


def _log_relisted(old: Sequence[ShardPiece], new: Sequence[ShardPiece]) -> None:
    """Log the parameters whose source moved: 'fc1.weight float32 cpu -> float64 cpu' (INFO on rank 0)."""
    from dist_ema.collective import rank

    before = {p.fqn: p.source for p in old}
    moved: dict[str, str] = {}
    for p in new:
        a, b = before.get(p.fqn), p.source
        if a is not None and a.data_ptr() != b.data_ptr():
            moved.setdefault(p.fqn, f"{p.fqn} {str(a.dtype)[6:]} {a.device} -> {str(b.dtype)[6:]} {b.device}")
    lines = list(moved.values())
    level = logging.INFO if rank() == 0 and lines else logging.DEBUG
    log.log(level, "dist-ema: the model's parameter storages moved; re-listed the EMA's views of %d "
            "parameter(s): %s", len(lines), "; ".join(lines[:12]) + (f"; and {len(lines) - 12} more"
                                                                      if len(lines) > 12 else ""))


def _unwrap_module(obj: object) -> torch.nn.Module:
    inner = getattr(obj, "module", obj)  # DDP and DeepSpeed engines keep the model in .module
    return inner if isinstance(inner, torch.nn.Module) else obj  # type: ignore[return-value]


def _piece_order(pieces: Sequence[ShardPiece]) -> list[int]:
    """The order of the pieces in the EMA's flat buffers.

    Owned pieces first: a snapshot writes one contiguous prefix of each flat buffer. Within
    each part, blocks of pieces that are neighbours in the source's memory (a flat parameter,
    a ZeRO partition) stay together and in order, so the update sees them as one run; small
    blocks go last, next to each other, so the update stages them as one flat run.
    """
    from dist_ema.kernels import DEFAULT_MIN_NUMEL, adjacent

    blocks: list[list[int]] = []
    for i, p in enumerate(pieces):
        if blocks and pieces[blocks[-1][-1]].owner == p.owner and adjacent(pieces[blocks[-1][-1]].source, p.source):
            blocks[-1].append(i)
        else:
            blocks.append([i])
    small = [sum(pieces[i].numel for i in b) < DEFAULT_MIN_NUMEL for b in blocks]
    order = sorted(range(len(blocks)), key=lambda b: (not pieces[blocks[b][0]].owner, small[b]))
    return [i for b in order for i in blocks[b]]


def _tied_names(model_or_engine: object, layout: ShardLayout) -> dict[str, str]:
    """{alias: tracked name} for parameters registered under several names (tied weights)."""
    from dist_ema.sharding.replicated import clean_fqn

    module = _unwrap_module(model_or_engine)
    if not isinstance(module, torch.nn.Module):
        return {}
    first: dict[int, str] = {}
    ties: dict[str, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        name = clean_fqn(name)
        if id(p) not in first:
            first[id(p)] = name
        elif first[id(p)] in layout.params and name not in layout.params:
            ties[name] = first[id(p)]
    return ties


def _place(full: torch.Tensor, shape: tuple[int, ...], start: int, values: torch.Tensor, box: tuple | None) -> None:
    """Write a piece's values into the flat full tensor of ``shape``."""
    if box is None:
        full[start : start + values.numel()] = values
        return
    sub = full.view(shape)[tuple(slice(a, a + n) for a, n in zip(*box))]
    for offs, sizes, a, b in flat_blocks(start, start + values.numel(), box[1]):
        sub[tuple(slice(o, o + z) for o, z in zip(offs, sizes))] = values[a - start : b - start].view(sizes)
