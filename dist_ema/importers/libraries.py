"""What each single-GPU post-hoc EMA library writes, and how its EMA runs (pure data, no I/O).

All three libraries descend from ema-pytorch's ``KarrasEMA``: per tracked profile one EMA
that counts its own calls i = 1, 2, ... (i after the increment), updates at the calls with
``(i - 1) % update_every == 0``, copies the weights at its first update and otherwise lerps
with the ONE-STEP beta_i = (1 - 1/(i + 1))^(gamma + 1) (whatever update_every is). With
update_every = 1 that is exactly dist-ema's power-function profile at t = i + 1 over a time
axis on which the weights after call c cover [c, c + 1] and the first call's weights [0, 2]
(tests/test_import.py checks it on a one-hot trajectory). Each library writes one file per
profile, ``<profile index>.<step>.pt``, every ``checkpoint_every`` steps.

Source references are to the versions these conventions were read from (``CHECKED``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dist_ema.errors import ConfigError

__all__ = ["EDM2_KINDS", "FILE_NAME", "LIBRARIES", "Library", "is_edm2", "resolve_kind"]

FILE_NAME = re.compile(r"^(\d+)\.(\d+)\.pt$")  # <profile index>.<step>.pt, the same in all three


@dataclass(frozen=True)
class Library:
    """One library's conventions.

    Attributes:
        kind: the name ``dist-ema import`` takes.
        checked: the release whose source these conventions were read from.
        prefix: the prefix of the EMA'd tensors' names in a file ("" for none).
        state_keys: the library's own entries of a file (not tensors of the model).
        update_every: the library's default update_every (what a run that did not set it used).
        update_after_step: the library's default first step with an EMA update (1: the first step).
        checkpoint_dtype: the library's default file dtype (None: the model's own).
        keeps: files kept per profile by default (None: all).
        refs: where the conventions are in the library's source.
    """

    kind: str
    checked: str
    prefix: str
    state_keys: tuple[str, ...]
    update_every: int
    update_after_step: int = 1
    checkpoint_dtype: str | None = None
    keeps: int | None = None
    refs: str = ""

    def ema_calls(self, step: int, update_after_step: int) -> int:
        """The EMA's own call count i at a file written at ``step`` (the library's step count)."""
        return int(step) - int(update_after_step) + 1


LIBRARIES: dict[str, Library] = {
    "ema-pytorch": Library(
        kind="ema-pytorch", checked="ema-pytorch 0.8.3", prefix="ema_model.", state_keys=("initted", "step"),
        update_every=100, checkpoint_dtype="float16",
        refs="ema_pytorch/post_hoc_ema.py: KarrasEMA(update_every=100) l.59, beta l.137-138, update l.177-188 "
             "(first update copies l.184-186), checkpoint() l.347-359 ('{ind}.{step}.pt' l.351, every entry, step "
             "included, cast to checkpoint_dtype l.355, default float16 l.289), synthesize_ema_model t = file step "
             "l.386-389, coefficients not normalized l.404-430",
    ),
    "nitrous-ema": Library(
        kind="nitrous-ema", checked="nitrous-ema 0.0.1", prefix="ema_model.", state_keys=("_extra_state",),
        update_every=100, checkpoint_dtype="float32",
        refs="nitrous_ema/ema.py: KarrasEMA(update_every=100) l.67, beta l.145-153 (step_size_correction "
             "l.147-151), update l.195-206, step and initted as _extra_state l.280-285, checkpoint() l.383-391 "
             "('{ind}.{step}.pt' l.387, module cast to checkpoint_dtype l.390, default float32 l.329), "
             "synthesize_ema_model t = file step l.411-416",
    ),
    "posthoc-ema": Library(
        kind="posthoc-ema", checked="pytorch-posthoc-ema 1.0.10", prefix="", state_keys=("initted", "step"),
        update_every=10, update_after_step=100, checkpoint_dtype=None, keeps=20,
        refs="posthoc_ema/posthoc_ema.py: PostHocEMA(max_checkpoints=20, update_every=10, update_after_step=100) "
             "l.40-47, update_() l.244-269 (no EMA call while step < update_after_step l.254), "
             "_create_checkpoint() l.271-313 ('{idx}.{step}.pt' l.275, optional checkpoint_dtype cast l.297-301, "
             "only the last max_checkpoints kept l.307-313), state_dict() synthesis t = file step l.465-466, "
             "target t = the last file's l.124 of utils.py, float32 solve l.118-120; karras_ema.py: beta "
             "l.125-128, update l.130-143, integer buffers copied l.41-46, file entries l.269-289",
    ),
}

_ALIASES = {"ema_pytorch": "ema-pytorch", "lucidrains": "ema-pytorch", "nitrous_ema": "nitrous-ema",
            "pytorch-posthoc-ema": "posthoc-ema", "posthoc_ema": "posthoc-ema", "pytorch_posthoc_ema": "posthoc-ema"}


def resolve_kind(kind: str) -> Library:
    """The library named ``kind`` (its pip or import name works too), or ConfigError naming the choices."""
    if not isinstance(kind, str):
        raise ConfigError(f"kind must be one of {sorted(LIBRARIES)}; got {kind!r}")
    key = _ALIASES.get(kind.strip().lower(), kind.strip().lower())
    if key in LIBRARIES:
        return LIBRARIES[key]
    if key in EDM2_KINDS:
        raise ConfigError(EDM2_REFUSAL)
    raise ConfigError(f"unknown kind {kind!r}: dist-ema import reads the checkpoint folders of "
                      f"{', '.join(sorted(LIBRARIES))}, and EDM2's run folders (edm2)")


EDM2_KINDS = ("edm2", "network-snapshot", "edm")  # the names of EDM2's kind (importers/edm2.py)


def is_edm2(kind: object) -> bool:
    return isinstance(kind, str) and kind.strip().lower() in EDM2_KINDS


# EDM2's network-snapshot-<kimg>-<std>.pkl files are pickles of persistent classes: loading one runs
# EDM2's code (torch_utils.persistence), which is not installable from PyPI. dist-ema unpickles nothing
# from a checkpoint folder in its own process; `dist-ema import edm2 --allow-pickle` loads them in a child
# process (importers/edm2.py), only when asked.
EDM2_REFUSAL = (
    "EDM2's network-snapshot-*.pkl files are pickles whose loading runs code (EDM2's torch_utils.persistence "
    "re-creates classes from source stored in the file): dist-ema does not unpickle them unless asked to, and then "
    "only in a child process. For files you trust: dist-ema import edm2 SRC STORE --allow-pickle --edm2-code "
    "EDM2_CODE (import_run('edm2', SRC, STORE, allow_pickle=True, edm2_code=EDM2_CODE)), EDM2_CODE being the "
    "folder of EDM2's code (a clone of github.com/NVlabs/edm2, holding dnnlib/ and torch_utils/)"
)
