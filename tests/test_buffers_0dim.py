"""Buffers of every shape in snapshots: 0-dim (BatchNorm's num_batches_tracked), empty, non-contiguous,
bool and integer. The stored bytes are compared with a plain read of the model's own buffers."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from dist_ema.load import load_synthesized
from dist_ema.synthesis import synthesize
from dist_ema.tracker import PostHocEMA


class _Odd(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)  # running_mean, running_var, 0-dim num_batches_tracked
        self.register_buffer("scalar_f", torch.tensor(2.5))
        self.register_buffer("empty", torch.zeros(0, 3))
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("strided", torch.arange(12.0).reshape(3, 4).t())  # not contiguous
        self.register_buffer("bf16", torch.linspace(-3, 3, 5).to(torch.bfloat16))  # numpy has no bfloat16
        self.register_buffer("f16", torch.linspace(-1, 1, 4).to(torch.float16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).mean() * self.scalar_f


def test_zero_dim_and_odd_buffers_snapshot_and_synthesize(tmp_path):
    torch.manual_seed(0)
    m = _Odd()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    url = str(tmp_path / "s")
    ema = PostHocEMA(m, sigma_rels=(0.05, 0.1), store=url, snapshot_every=2, writer="sync")
    for _ in range(4):
        m(torch.randn(2, 3, 6, 6)).backward()
        opt.step()
        opt.zero_grad()
        ema.update()
    ema.close()
    assert int(m.bn.num_batches_tracked) == 4
    out = tmp_path / "out"
    synthesize(url, sigma_rels=[0.07], out=str(out))
    files = list(out.rglob("*.safetensors"))
    assert len(files) == 1
    got = load_file(str(files[0]))
    for name, b in m.named_buffers():
        assert got[name].shape == b.shape, name
        assert got[name].dtype == b.dtype, name
        assert torch.equal(got[name], b), name
    # the same buffers straight into a fresh model (its own buffers differ before)
    fresh = _Odd()
    for b in fresh.buffers():
        if b.numel():
            b.fill_(7)
    load_synthesized(fresh, url, sigma_rel=0.07)
    for (name, b), (_, want) in zip(fresh.named_buffers(), m.named_buffers()):
        assert b.dtype == want.dtype and torch.equal(b, want), name
