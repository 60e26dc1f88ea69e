"""Engine adapters: list each rank's own parameter shards as :class:`ShardPiece` records."""

from dist_ema.sharding.base import ShardLayout, ShardPiece, UnsupportedEngineError

__all__ = ["ShardLayout", "ShardPiece", "UnsupportedEngineError"]
