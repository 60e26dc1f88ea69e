#!/usr/bin/env python
"""Example training script with post-hoc EMA: an MLP on scikit-learn's 8x8 digits, any engine.

    torchrun --nproc-per-node 2 launch/train.py --config configs/dist_ema.toml --engine fsdp2 \
        --store runs/exp1/snapshots
    deepspeed --num_gpus 2 --master_port 29600 launch/train.py --deepspeed_config configs/ds_zero2.json \
        --config configs/dist_ema.toml --store runs/exp2/snapshots

Copy it and replace the model and data with yours. The lines that add dist-ema are marked
``# dist-ema``; everything else is an ordinary data-parallel training loop. The learning
rate is deliberately high, so the raw weights keep jumping around the optimum and an EMA
of them has a visibly lower held-out loss (``launch/run_demo.py`` sweeps sigma_rel).

Engines (``--engine`` or ``[train] engine`` in the config): fsdp2 (``fully_shard``), fsdp2_tp
(FSDP2 over a ``dp`` mesh axis x tensor parallel over ``tp``, ``--tp`` ranks: fc1 column-, fc2
row-parallel, as torchtitan trains large models), fsdp1 (``FullyShardedDataParallel``), ddp,
zero1/zero2/zero3 (DeepSpeed, configs/ds_zero*.json or ``--deepspeed_config``). CPU + gloo when
there is no GPU, one GPU per rank + NCCL otherwise.

Settings: built-in defaults < the config file (``[train]`` and ``[dist_ema]`` tables) < flags.
``--resume`` continues a run from the training checkpoint of ``--checkpoint-dir`` and the
EMA from the snapshot store (both must be at the same step: the script saves both at the end).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dist_ema import PostHocEMA  # dist-ema
from dist_ema.config import (  # dist-ema
    add_config_arguments,
    apply_overrides,
    config_from_args,
    load_toml,
    parse_args,
)

log = logging.getLogger("dist_ema")

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("fsdp2", "fsdp2_tp", "fsdp1", "ddp", "zero1", "zero2", "zero3")
HELD_OUT = 360  # digits kept out of training (of 1797), the same for every run
DEFAULT_SNAPSHOTS = 20  # snapshots over a run when --snapshot-every is not given (see `dist-ema error`)
TRAIN_DEFAULTS: dict[str, Any] = {  # [train] table keys and their defaults
    "engine": "fsdp2",  # one of ENGINES
    "steps": 500,  # optimizer steps in total (a resumed run continues up to this)
    "lr": 0.02,  # AdamW learning rate
    "batch_size": 16,  # samples per rank and step
    "seed": 0,  # model init and data order
    "hidden": 128,  # MLP width
    "log_every": 100,  # steps between progress lines (rank 0)
    "tp": 2,  # tensor-parallel ranks per data-parallel rank (engine fsdp2_tp)
}


# ------------------------------------------------------------------------------- model, data


class DigitsMLP(nn.Module):
    """64 pixels -> 10 classes; small enough to train in seconds on a CPU."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _digits() -> tuple[Any, Any]:
    """(pixels 0-16, labels) of scikit-learn's ``load_digits()``.

    Read from the CSV file scikit-learn ships, without importing scikit-learn: the import
    takes seconds, in every rank and in the evaluation. Same arrays as ``load_digits()``.
    """
    import gzip
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as f:
                data = np.loadtxt(f, delimiter=",")
            return data[:, :-1], data[:, -1].astype(int)
    from sklearn.datasets import load_digits  # another layout: scikit-learn's own loader

    d = load_digits()
    return d.data, d.target


def load_digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8x8 digits that ship with scikit-learn (no download), pixels scaled to [0, 1].

    ``split`` is "train" or "heldout"; the split is fixed (seed 0), so every run and the
    evaluation see the same held-out digits.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout'; got {split!r}")
    data, target = _digits()
    x = torch.tensor(data, dtype=torch.float32) / 16.0
    y = torch.tensor(target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    idx = perm[:HELD_OUT] if split == "heldout" else perm[HELD_OUT:]
    return x[idx], y[idx]


def batch_for(step: int, rank: int, seed: int, n: int, size: int) -> torch.Tensor:
    """Indices of rank ``rank``'s batch at ``step``: a pure function of (seed, step, rank), so resume replays it."""
    g = torch.Generator().manual_seed(seed * 10**9 + step * 10**4 + rank)
    return torch.randint(0, n, (size,), generator=g)


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on (x, y). Collective for sharded models: call on every rank."""
    logits = forward(x.to(dtype)).float()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


# ------------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=ENGINES, default=None, help="parallelism (default: [train] engine, fsdp2)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (default 500)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 0.02)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per rank and step (default 16)")
    p.add_argument("--seed", type=int, default=None, help="model init and data order (default 0)")
    p.add_argument("--hidden", type=int, default=None, help="MLP width (default 128)")
    p.add_argument("--log-every", type=int, default=None, help="steps between progress lines (default 100)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree of --engine fsdp2_tp (default 2)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default): one GPU per rank + NCCL when there are GPUs, else CPU + gloo")
    p.add_argument("--save-final", metavar="FILE.safetensors", default=None,
                   help="write the final raw (non-EMA) fp32 weights, gathered on rank 0")
    p.add_argument("--checkpoint-dir", metavar="DIR", default=None,
                   help="write a training checkpoint (model + optimizer) at the end; --resume reads it")
    p.add_argument("--resume", action="store_true",
                   help="continue: model/optimizer from --checkpoint-dir, EMA from the snapshot store")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   metavar="FILE.json", help="DeepSpeed JSON config (default configs/ds_zero<stage>.json); "
                   "implies --engine zero<stage> when --engine is not given")
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # deepspeed's own flag: accepted
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help="set by the deepspeed launcher / torch.distributed.launch (LOCAL_RANK wins when set)")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error on every rank (default: one line, from rank 0)")
    add_config_arguments(p)  # dist-ema: --config, --store, --sigma-rels, --snapshot-every, ...
    return p


@dataclass(frozen=True)
class TrainSettings:
    """The training loop's settings after merging defaults, the [train] table and flags."""

    engine: str
    steps: int
    lr: float
    batch_size: int
    seed: int
    hidden: int
    log_every: int
    tp: int
    deepspeed_config: str | None


def train_settings(args: argparse.Namespace) -> TrainSettings:
    """Defaults < ``[train]`` table of --config < flags; ValueError naming the key and the fix."""
    table: dict[str, Any] = {}
    if args.config:
        table = dict(load_toml(args.config).get("train", {}))
        unknown = sorted(set(table) - set(TRAIN_DEFAULTS))
        if unknown:
            raise ValueError(f"{args.config}: unknown key(s) {unknown} in [train]; valid: {sorted(TRAIN_DEFAULTS)}")
    merged = {**TRAIN_DEFAULTS, **table}
    flags = {k: getattr(args, k) for k in TRAIN_DEFAULTS if getattr(args, k) is not None}
    ds_config = args.deepspeed_config
    if ds_config is not None and "engine" not in flags:
        stage = int(_read_json(ds_config).get("zero_optimization", {}).get("stage", 0))
        if stage not in (1, 2, 3):
            raise ValueError(f"{ds_config}: zero_optimization.stage must be 1, 2 or 3 for this script; got {stage}")
        flags["engine"] = f"zero{stage}"
    merged.update(flags)
    if merged["engine"] not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}; got {merged['engine']!r} (--engine or [train] engine)")
    for key in ("steps", "batch_size", "hidden", "log_every", "tp"):
        v = merged[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{key} must be an integer >= 1; got {v!r} (--{key.replace('_', '-')} or [train] {key})")
    if not (isinstance(merged["lr"], (int, float)) and merged["lr"] > 0):
        raise ValueError(f"lr must be a number > 0; got {merged['lr']!r} (--lr or [train] lr)")
    if not merged["engine"].startswith("zero") and ds_config is not None:
        raise ValueError(f"--deepspeed_config is for the zero engines; --engine is {merged['engine']}")
    return TrainSettings(deepspeed_config=ds_config, **{k: merged[k] for k in TRAIN_DEFAULTS})


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"DeepSpeed config {path!r} does not exist") from None
    except ValueError as e:
        raise ValueError(f"DeepSpeed config {path!r} is not valid JSON: {e}") from None


# ------------------------------------------------------------------------------- engines


@dataclass
class Engine:
    """A model under one engine, with what the loop needs to drive it."""

    name: str
    wrapped: Any  # what PostHocEMA receives: the FSDP/DDP module or the DeepSpeed engine
    train_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, y) -> loss; may not step (grad accum)
    input_dtype: torch.dtype
    full_state_dict: Callable[[], dict[str, torch.Tensor]]  # collective; full fp32 weights on rank 0
    save_checkpoint: Callable[[str, int], None]  # collective
    load_checkpoint: Callable[[str], int]  # collective; returns the checkpoint's step
    data_rank: int | None = None  # whose batches this rank trains on (tensor-parallel ranks share them)


def init_distributed(device_arg: str, local_rank_arg: int | None) -> tuple[int, int, torch.device]:
    """Join the launcher's process group: NCCL with one GPU per rank, or gloo on CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but torch sees no GPU; use --device cpu")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # DeepSpeed picks its accelerator at import time; without a GPU it must be told
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        raise ValueError("RANK/WORLD_SIZE are not set: start this script with torchrun or the deepspeed launcher "
                         "(e.g. torchrun --nproc-per-node 2 launch/train.py ...)")
    dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


def _torch_checkpointing(model: nn.Module, opt: torch.optim.Optimizer):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_state_dict,
    )

    def full() -> dict[str, torch.Tensor]:
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.float().contiguous() for k, v in sd.items()}

    def save(path: str, step: int) -> None:
        msd, osd = get_state_dict(model, opt)
        with warnings.catch_warnings():  # a resumed run replaces the checkpoint it started from, on purpose
            warnings.filterwarnings("ignore", message="Detected an existing checkpoint")
            dcp.save({"model": msd, "optim": osd, "step": torch.tensor(step)},
                     storage_writer=dcp.FileSystemWriter(path, overwrite=True))

    def load(path: str) -> int:
        if not os.path.exists(os.path.join(path, ".metadata")):
            raise ValueError(f"--resume: no checkpoint in {path!r} (written by a run with --checkpoint-dir {path})")
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd, "step": torch.tensor(0)}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return int(state["step"])

    return full, save, load


def build_engine(s: TrainSettings, device: torch.device, world: int) -> Engine:
    """Wrap a fresh DigitsMLP (same init on every rank) in the chosen engine."""
    torch.manual_seed(s.seed)
    net = DigitsMLP(s.hidden).to(device)

    if s.engine.startswith("zero"):
        return _build_deepspeed(net, s, device)

    data_rank = None
    if s.engine in ("fsdp2", "fsdp2_tp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if s.engine == "fsdp2":
            mesh = init_device_mesh(device.type, (world,))
        else:  # 2-D: FSDP2 over dp x tensor parallel over tp
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            if world % s.tp:
                raise ValueError(f"--tp {s.tp} does not divide the {world} ranks; use a tp that divides them")
            mesh2 = init_device_mesh(device.type, (world // s.tp, s.tp), mesh_dim_names=("dp", "tp"))
            parallelize_module(net, mesh2["tp"], {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
            mesh, data_rank = mesh2["dp"], mesh2["dp"].get_local_rank()
        for layer in (net.fc1, net.fc2, net.head):
            fully_shard(layer, mesh=mesh)
        model: nn.Module = fully_shard(net, mesh=mesh)
    elif s.engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        model = FSDP(net, auto_wrap_policy=ModuleWrapPolicy({nn.Linear}), use_orig_params=True, device_id=device)
    else:  # ddp
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    opt = torch.optim.AdamW(model.parameters(), lr=s.lr)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    full, save, load = _torch_checkpointing(model, opt)
    return Engine(s.engine, model, train_step, torch.float32, full, save, load, data_rank)


def _build_deepspeed(net: nn.Module, s: TrainSettings, device: torch.device) -> Engine:
    import deepspeed

    if device.type == "cpu":
        import deepspeed.comm.torch  # noqa: F401  (the attribute deepspeed.comm.torch is torch itself)

        # On CPU, deepspeed.initialize JIT-compiles a shared-memory op (~60 s, needs g++ and ninja)
        # that only inference all-reduce uses; training does not need it, so skip the build.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    stage = int(s.engine[-1])
    path = s.deepspeed_config or str(ROOT / "configs" / f"ds_zero{stage}.json")
    cfg = _read_json(path)
    if int(cfg.get("zero_optimization", {}).get("stage", -1)) != stage:
        raise ValueError(f"{path} configures ZeRO stage {cfg.get('zero_optimization', {}).get('stage')}, "
                         f"--engine is {s.engine}; pass the matching --deepspeed_config")
    # the script owns the batch size: --batch-size samples per rank and optimizer step, split into
    # gradient_accumulation_steps micro-batches (DeepSpeed derives the global batch from these)
    accum = int(cfg.get("gradient_accumulation_steps", 1))
    if accum < 1 or s.batch_size % accum:
        raise ValueError(f"--batch-size {s.batch_size} must be a multiple of gradient_accumulation_steps={accum} "
                         f"in {path}")
    cfg["train_micro_batch_size_per_gpu"] = s.batch_size // accum
    cfg.pop("train_batch_size", None)
    # a torch optimizer: an optimizer named in the JSON would JIT-build DeepSpeed's fused CPU Adam
    opt = torch.optim.AdamW(net.parameters(), lr=s.lr)
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=cfg)
    dtype = torch.bfloat16 if cfg.get("bf16", {}).get("enabled") else (
        torch.float16 if cfg.get("fp16", {}).get("enabled") else torch.float32)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # one optimizer step = `accum` micro-batches (slices of this step's batch)
        loss_sum = torch.zeros((), device=x.device)
        for xb, yb in zip(x.chunk(accum), y.chunk(accum)):
            loss = F.cross_entropy(engine(xb.to(dtype)).float(), yb)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach()
        return loss_sum / accum

    def full() -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        # collective under ZeRO-3 (gathers) and ZeRO-1/2 (all-reduce): every rank, same order
        out = {n: safe_get_full_fp32_param(p).detach().float().cpu().contiguous()
               for n, p in engine.module.named_parameters()}
        return out if dist.get_rank() == 0 else {}

    def save(path: str, step: int) -> None:
        engine.save_checkpoint(path, tag="latest_dist_ema_example", client_state={"step": step})

    def load(path: str) -> int:
        loaded, client = engine.load_checkpoint(path, tag="latest_dist_ema_example")
        if loaded is None:
            raise ValueError(f"--resume: no DeepSpeed checkpoint in {path!r}")
        return int(client["step"])

    return Engine(s.engine, engine, train_step, dtype, full, save, load)


# ------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)  # argparse, with 'did you mean --snapshot-every?' for typos
    s = train_settings(args)
    ema_cfg = config_from_args(args)  # dist-ema: [dist_ema] table of --config, flags override
    if ema_cfg.store is not None and ema_cfg.snapshot_every is None:
        # dist-ema: without a schedule a run would write one snapshot (at the end), from which no other
        # sigma_rel can be reconstructed: default to DEFAULT_SNAPSHOTS spread over the run
        every = max(1, s.steps // (DEFAULT_SNAPSHOTS * ema_cfg.update_every))
        ema_cfg = apply_overrides(ema_cfg, {"snapshot_every": every})
        n = s.steps // (every * ema_cfg.update_every)
        default_schedule = (f"dist-ema: no snapshot_every given: a snapshot every {every} EMA update(s), {n} over "
                            f"{s.steps} steps; plan yours with `dist-ema error` and pass --snapshot-every")
    else:
        default_schedule = None
    ema_kwargs = ema_cfg.ema_kwargs()  # dist-ema: validated before any process starts talking
    if args.resume and not args.checkpoint_dir:
        raise ValueError("--resume needs --checkpoint-dir (the model/optimizer checkpoint of the previous run)")
    if args.resume and ema_cfg.store is None:
        raise ValueError("--resume needs a snapshot store (--store or [dist_ema] store) to resume the EMA from")

    rank, world, device = init_distributed(args.device, args.local_rank)
    # this script's and dist-ema's lines from rank 0 (warnings from every rank); other libraries' from WARNING
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    log.info("train: engine=%s ranks=%d device=%s steps=%d lr=%g batch=%dx%d", s.engine, world, device, s.steps,
             s.lr, world, s.batch_size)
    log.info("dist-ema: %s", ema_cfg.describe())
    if default_schedule:
        log.info(default_schedule)

    x_train, y_train = (t.to(device) for t in load_digits_split("train"))
    x_held, y_held = (t.to(device) for t in load_digits_split("heldout"))
    eng = build_engine(s, device, world)
    start = 0
    if args.resume:
        start = eng.load_checkpoint(args.checkpoint_dir)
        log.info("train: resumed model and optimizer at step %d from %s", start, args.checkpoint_dir)

    # dist-ema: one line to create the EMAs; with resume, they continue from the newest snapshot
    ema = PostHocEMA(eng.wrapped, **ema_kwargs, resume=args.resume)
    with ema:  # dist-ema: on an exception, stops the snapshot writer without collectives
        if ema.step != start:
            raise ValueError(f"the EMA resumed at step {ema.step} (newest snapshot in {ema_cfg.store}) but the "
                             f"training checkpoint is at step {start}; resume needs both from the same run and step")
        t0 = time.perf_counter()
        for step in range(start, s.steps):
            data_rank = rank if eng.data_rank is None else eng.data_rank
            idx = batch_for(step, data_rank, s.seed, len(x_train), s.batch_size).to(device)
            loss = eng.train_step(x_train[idx].to(eng.input_dtype), y_train[idx])
            ema.update()  # dist-ema: after every optimizer step (skipped DeepSpeed steps are detected)
            if (step + 1) % s.log_every == 0 or step + 1 == s.steps:
                log.info("step %d/%d  loss %.4f  (%.1f ms/step)", step + 1, s.steps, loss.item(),
                         1e3 * (time.perf_counter() - t0) / (step + 1 - start))
        seconds = time.perf_counter() - t0
        ema.close()  # dist-ema: a final snapshot of the steps after the last one, then wait until all are committed

        # held-out loss of the raw weights and of each tracked EMA (swapped in, then restored)
        results = [("raw weights", *evaluate(eng.wrapped, x_held, y_held, eng.input_dtype))]
        if ema.updates > 0:
            for sr in ema.sigma_rels:
                with ema.swapped(sigma_rel=sr):  # dist-ema: any sigma_rel; tracked ones are used as they are
                    results.append((f"EMA sigma_rel={sr:g}", *evaluate(eng.wrapped, x_held, y_held,
                                                                       eng.input_dtype)))
    if args.save_final:
        sd = eng.full_state_dict()
        if rank == 0:
            from safetensors.torch import save_file

            Path(args.save_final).parent.mkdir(parents=True, exist_ok=True)
            save_file(sd, args.save_final, metadata={"step": str(max(start, s.steps)), "engine": s.engine})
    if args.checkpoint_dir:
        eng.save_checkpoint(args.checkpoint_dir, max(start, s.steps))
    if rank == 0:
        _summary(s, world, device, start, seconds, ema, ema_cfg.store, ema_cfg.storage_options, results)
    return 0


def _summary(s: TrainSettings, world: int, device: torch.device, start: int, seconds: float, ema: PostHocEMA,
             store: str | None, storage_options: dict | None, results: list[tuple[str, float, float]]) -> None:
    steps = s.steps - start
    print(f"trained {s.engine} on {world} rank(s) ({device.type}): steps {start}->{s.steps} in {seconds:.1f} s "
          f"({1e3 * seconds / max(steps, 1):.1f} ms/step)")
    if store is not None:
        from dist_ema import open_store

        n = len(open_store(store, storage_options).snapshots())
        print(f"snapshots: {n} committed in {store} (tracked sigma_rels {', '.join(f'{x:g}' for x in ema.sigma_rels)})")
    print(f"held-out ({HELD_OUT} digits)        loss   accuracy")
    for name, loss, acc in results:
        print(f"  {name:<24} {loss:8.4f}   {100 * acc:6.2f}%")
    if not all(math.isfinite(r[1]) for r in results):
        log.warning("train: non-finite held-out loss; lower --lr")


# library wording -> this script's flags, in one-line error messages
_SCRIPT_WORDS = (("pass resume=True", "pass --resume"), ("resume=True", "--resume"),
                 ('on_error="warn"', "--on-error warn"), ('when_behind="skip"', "--when-behind skip"))
GRACE_S = 5.0  # a rank other than 0 waits this long before reporting an error itself (rank 0 usually does)


def user_error(e: BaseException) -> bool:
    """An error the user can fix from the command line (a setting, the store, the endpoint): no traceback."""
    from dist_ema.sharding.base import UnsupportedEngineError
    from dist_ema.store.fs import UNREACHABLE, StoreError, classify

    fixable = (ValueError, StoreError, UnsupportedEngineError, FileExistsError)
    return isinstance(e, fixable) or classify(e) == UNREACHABLE


def error_line(e: BaseException) -> str:
    """The one line printed for a user error, phrased for this script."""
    from dist_ema.store.fs import UNREACHABLE, StoreError, classify, unreachable_message

    if not isinstance(e, (ValueError, StoreError)) and classify(e) == UNREACHABLE:
        text = unreachable_message(e, "the snapshot store")
    else:
        text = str(e)
    text = " ".join(text.split())
    for lib, script in _SCRIPT_WORDS:
        text = text.replace(lib, script)
    return f"train.py: error: {text}"


def report_and_exit_code(e: BaseException, debug: bool) -> int:
    """Print a failure the launcher way: one line from rank 0 for user errors, tracebacks with --debug.

    Every rank of the job usually raises the same error (dist-ema raises store errors on every
    rank). Rank 0 prints it; the other ranks wait GRACE_S first: the launcher stops them when rank
    0 exits, so the job prints one line. A rank that fails alone still prints its line after the wait.
    """
    rank = int(os.environ.get("RANK", "0") or 0)
    if debug or not user_error(e):
        traceback.print_exc()
        return 2 if user_error(e) else 1
    if rank != 0:
        sys.stderr.flush()
        time.sleep(GRACE_S)
        print(f"{error_line(e)} (rank {rank})", file=sys.stderr)
    else:
        print(error_line(e), file=sys.stderr)
    return 2


if __name__ == "__main__":
    code = 1
    try:
        code = main()
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except SystemExit as e:  # argparse --help / usage errors
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:  # noqa: BLE001 - reported in one line (user errors) or with its traceback
        code = report_and_exit_code(e, "--debug" in sys.argv[1:])
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # gloo's threads can abort the interpreter at exit after all work finished: leave at once
    os._exit(code)
