"""dist-ema: post-hoc EMA (Karras et al., EDM2) for sharded training under FSDP and DeepSpeed ZeRO."""

from dist_ema.phema import gamma_to_sigma_rel, sigma_rel_to_gamma, solve_coefficients

__version__ = "0.1.0"

__all__ = ["__version__", "gamma_to_sigma_rel", "sigma_rel_to_gamma", "solve_coefficients"]
