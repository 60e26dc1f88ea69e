"""Integrations with training frameworks; each is an optional extra, imported only when used.

- :mod:`dist_ema.integrations.lightning`: ``PostHocEMACallback`` for a Lightning ``Trainer``
  (``pip install "dist-ema[lightning]"``).
- :mod:`dist_ema.integrations.accelerate`: ``attach_ema`` for an HF ``Accelerator``
  (``pip install "dist-ema[accelerate]"``).

Both build the EMA on the model as the framework sharded it (no gather), and checkpoint it
with torch.distributed.checkpoint next to the framework's own checkpoint, every rank
writing its own shards.
"""
