"""A zoo of real architectures, built from configs (no downloads), under every engine on CPU.

    spec = MODELS["llama"]
    run = wrap("fsdp2", spec, seed=0)       # inside a gloo worker
    run.step(1)                             # one optimizer step on batch 1
    full = run.full_params()               # {name: float64 full tensor} (collective), every rank
    bufs = run.buffers()                    # {name: tensor}: this rank's persistent buffers

Each model stands for a class of models that must track, snapshot, resume, swap and synthesize:

- ``bn_cnn``: BatchNorm (running stats and the 0-dim ``num_batches_tracked`` buffer);
- ``gpt2``: ``transformers`` GPT-2 with tied input/output embeddings, the position embedding frozen
  (a frozen parameter that is tracked);
- ``llama``: ``transformers`` Llama: RMSNorm, non-persistent rotary buffers, grouped KV heads;
- ``embedding``: most parameters in one embedding table, few rows touched per step;
- ``lora``: a frozen base with LoRA adapters, tracked without the frozen part (``include_frozen=False``);
- ``shared``: one module registered under two names and applied twice.

All are a few thousand parameters. Engines as in tests/engines.py: replicated (a plain module, every
rank owns a slice), ddp, fsdp2 and fsdp1 (every block its own unit, then the root), zero1/2/3.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812
from torch import nn

ENGINES = ("replicated", "ddp", "fsdp2", "fsdp1", "zero1", "zero2", "zero3")
VOCAB = 32


# ----------------------------------------------------------------------------- the models


class BNCNN(nn.Module):
    """Two conv + BatchNorm blocks and a linear head (BatchNorm's 0-dim num_batches_tracked buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.head(h.mean(dim=(-1, -2)))


class EmbeddingHeavy(nn.Module):
    """A 600-row embedding table (most of the parameters), mean-pooled into a small head."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(600, 6)
        self.head = nn.Linear(6, 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.table(idx).mean(dim=1)).squeeze(-1)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: y = base(x) + x A^T B^T."""

    def __init__(self, n: int, rank: int = 2) -> None:
        super().__init__()
        self.base = nn.Linear(n, n)
        self.base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(rank, n) * 0.3)
        self.lora_B = nn.Parameter(torch.randn(n, rank) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.lora_A.t() @ self.lora_B.t()


class LoRANet(nn.Module):
    """A frozen embedding and two frozen layers with LoRA adapters, and a trainable head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 12)
        self.emb.requires_grad_(False)
        self.l1, self.l2 = LoRALinear(12), LoRALinear(12)
        self.head = nn.Linear(12, 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(self.emb(idx)))
        return self.head(torch.tanh(self.l2(h)).mean(dim=1)).squeeze(-1)


class SharedNet(nn.Module):
    """One block registered under two names (``block`` and ``block_again``) and applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
        self.block_again = self.block
        self.head = nn.Linear(8, 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.block(self.emb(idx)))
        h = torch.tanh(self.block_again(h))
        return self.head(h.mean(dim=1)).squeeze(-1)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=8, n_embd=8, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    model = GPT2LMHeadModel(cfg)
    model.transformer.wpe.requires_grad_(False)  # a frozen parameter that the EMA tracks (constant)
    return model


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=16, bos_token_id=0, eos_token_id=0,
                      pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _tokens(step: int, rank: int, n: int = 4, length: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, VOCAB, (n, length), generator=g)


def _lm_loss(fwd: Callable, step: int, rank: int) -> torch.Tensor:
    x = _tokens(step, rank)
    return fwd(input_ids=x, labels=x).loss


def _image_loss(fwd: Callable, step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
    return F.cross_entropy(fwd(x), y)


def _regression_loss(fwd: Callable, step: int, rank: int, rows: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    idx, y = torch.randint(0, rows, (4, 8), generator=g), torch.randn(4, generator=g)
    return ((fwd(idx) - y) ** 2).mean()


@dataclass(frozen=True)
class ZooModel:
    """One architecture: how to build it, its loss on batch ``step`` of ``rank``, its FSDP units."""

    name: str
    make: Callable[[], nn.Module]
    loss: Callable[[Callable, int, int], torch.Tensor]  # (forward callable, step, rank) -> scalar
    units: Callable[[nn.Module], list[nn.Module]] = lambda m: []  # submodules sharded as their own FSDP units
    ema_kwargs: dict = field(default_factory=dict)  # PostHocEMA options this class of models is tracked with


MODELS = {
    m.name: m
    for m in (
        ZooModel("bn_cnn", BNCNN, _image_loss, lambda m: [m.conv1, m.conv2]),
        ZooModel("gpt2", _gpt2, _lm_loss, lambda m: list(m.transformer.h)),
        ZooModel("llama", _llama, _lm_loss, lambda m: list(m.model.layers)),
        ZooModel("embedding", EmbeddingHeavy, lambda f, s, r: _regression_loss(f, s, r, rows=600)),
        ZooModel("lora", LoRANet, _regression_loss, lambda m: [m.l1, m.l2], {"include_frozen": False}),
        ZooModel("shared", SharedNet, _regression_loss),
    )
}


# ----------------------------------------------------------------------------- the engines


def clean(name: str) -> str:
    """A parameter or buffer name without FSDP1's wrapper prefix."""
    return name.replace("_fsdp_wrapped_module.", "")


@dataclass
class Run:
    """One model under one engine on the current process group."""

    engine: str
    net: nn.Module  # the user's module (inside the wrappers)
    target: object  # what PostHocEMA receives
    forward: Callable  # what the loss calls
    optimizer_step: Callable[[torch.Tensor], None]  # backward and step on a loss
    full_params: Callable[[], dict[str, torch.Tensor]]
    loss: Callable[[Callable, int, int], torch.Tensor]

    def step(self, step: int) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.optimizer_step(self.loss(self.forward, step, rank))

    def buffers(self) -> dict[str, torch.Tensor]:
        """This rank's persistent buffers (the ones ``state_dict()`` holds), by clean name."""
        out = {}
        for mod_name, mod in self.net.named_modules(remove_duplicate=False):
            for b_name, b in mod.named_buffers(recurse=False):
                if b_name not in mod._non_persistent_buffers_set:
                    out[clean(f"{mod_name}.{b_name}" if mod_name else b_name)] = b.detach().clone()
        return out


def trainable(net: nn.Module) -> list[nn.Parameter]:
    return [p for p in net.parameters() if p.requires_grad]


def wrap(engine: str, spec: ZooModel, seed: int = 0, lr: float = 0.02) -> Run:
    """Build ``spec``'s model under ``engine`` (AdamW on the trainable parameters)."""
    torch.manual_seed(seed)
    net = spec.make()
    if engine.startswith("zero"):
        return _deepspeed(engine, spec, net, lr)
    if engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for unit in spec.units(net):
            fully_shard(unit)
        model = fully_shard(net)

        def full() -> dict[str, torch.Tensor]:
            return {n: p.full_tensor().detach().double().clone() for n, p in net.named_parameters()}

    elif engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        units = {id(u) for u in spec.units(net)}
        for parent in list(net.modules()):
            for child_name, child in list(parent.named_children()):
                if id(child) in units:
                    setattr(parent, child_name, FSDP(child, use_orig_params=True, device_id=torch.device("cpu")))
        model = FSDP(net, use_orig_params=True, device_id=torch.device("cpu"))

        def full() -> dict[str, torch.Tensor]:
            with FSDP.summon_full_params(model, writeback=False):
                return {clean(n): p.detach().double().clone() for n, p in model.named_parameters()}

    elif engine in ("ddp", "replicated"):
        model = nn.parallel.DistributedDataParallel(net) if engine == "ddp" else net

        def full() -> dict[str, torch.Tensor]:
            return {n: p.detach().double().clone() for n, p in net.named_parameters()}

    else:
        raise ValueError(f"unknown engine {engine!r}; one of {ENGINES}")
    opt = torch.optim.AdamW(trainable(model), lr=lr)

    def optimizer_step(loss: torch.Tensor) -> None:
        loss.backward()
        if engine == "replicated" and dist.is_initialized():  # a plain module: average the gradients by hand
            for p in trainable(net):
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()
        opt.step()
        opt.zero_grad()

    return Run(engine, net, model, model, optimizer_step, full, spec.loss)


def _deepspeed(engine: str, spec: ZooModel, net: nn.Module, lr: float) -> Run:
    import sys

    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (the attribute deepspeed.comm.torch is torch itself)
    from deepspeed.utils import safe_get_full_fp32_param

    # only inference all-reduce needs the shared-memory op that deepspeed.initialize JIT-builds on CPU
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": int(engine[-1])},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    opt = torch.optim.AdamW(trainable(net), lr=lr)
    eng, *_ = deepspeed.initialize(model=net, optimizer=opt, config=cfg)

    def optimizer_step(loss: torch.Tensor) -> None:
        eng.backward(loss)
        eng.step()

    def full() -> dict[str, torch.Tensor]:
        out = {}
        for n, p in eng.module.named_parameters():  # ZeRO-3 gathers: every rank, in the same order
            value = safe_get_full_fp32_param(p)
            if value is None:  # a frozen parameter has no fp32 master: its working weights are the value
                with deepspeed.zero.GatheredParameters([p]):
                    value = p.detach().clone()
            out[n] = value.detach().double().clone()
        return out

    return Run(engine, eng.module, eng, eng, optimizer_step, full, spec.loss)
