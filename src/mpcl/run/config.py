"""Config checks that turn bad values into one-line errors before anything is built, and the
helpers that name keys in those errors (``override_key``, ``config_keys``, ``hydra_error_line``)."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mpcl.errors import ConfigError


def check_overrides(argv: list[str], conf_dir: Path) -> None:
    """Reject ``group=choice`` overrides whose choice has no ``conf/group/choice.yaml``.

    Hydra would also refuse them, but with a multi-line report; users get one line here.
    """
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~").removeprefix("override ").strip()
        group_dir = conf_dir / key
        if "." in key or not group_dir.is_dir() or value in ("", "null"):
            continue
        choices = sorted(
            p.relative_to(group_dir).with_suffix("").as_posix() for p in group_dir.rglob("*.yaml")
        )
        for choice in value.split(","):
            if choice not in choices:
                raise ConfigError(f"unknown {key} {choice!r}: choose one of {', '.join(choices)}")


# key, type, lower bound, bound excluded: checked when the key exists.
NUMBERS: tuple[tuple[str, type, float | None, bool], ...] = (
    ("trainer.max_steps", int, 0, True),
    ("trainer.log_every_n_steps", int, 0, True),
    ("data.batch_size", int, 0, True),
    ("data.val_batch_size", int, 0, True),
    ("data.num_workers", int, 0, False),
    ("seed", int, None, False),
    ("callbacks.model_checkpoint.every_n_train_steps", int, 0, False),
    ("uda.optimizer.lr", float, 0, True),
    ("uda.optimizer.weight_decay", float, 0, False),
    ("uda.scheduler.warmup_steps", int, 0, False),
    ("uda.head_lr_mult", float, 0, True),
)
_ABSENT = object()


def _select(cfg: DictConfig, key: str):
    try:
        return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=True)
    except OmegaConfBaseException as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key} cannot be resolved ({first})") from None


def _check_number(key: str, value, kind: type, low: float | None, strict: bool) -> None:
    """Raise unless ``value`` is a finite ``kind`` above ``low`` (absent and null pass,
    except for ``trainer.max_steps``, which training needs)."""
    if value is _ABSENT or (value is None and key != "trainer.max_steps"):
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and kind is int:
        ok = float(value).is_integer()
    if ok and low is not None:
        ok = value > low if strict else value >= low
    if not ok:
        if low is None:
            what = "an integer" if kind is int else "a number"
        elif kind is int and strict and low == 0:
            what = "a positive integer"
        else:
            what = f"{'>' if strict else '>='} {low}" + (" (an integer)" if kind is int else "")
        raise ConfigError(f"{key}={value!r} must be {what}")


def validate(cfg: DictConfig) -> None:
    """Check what no constructor sees, before anything is built (one-line ConfigError): the
    types and ranges of the numbers in ``NUMBERS`` (an integer written as ``4e4`` becomes
    40000 in ``cfg``), and that a GPU accelerator has a GPU. Every other value is checked
    once, by the constructor that takes it (its message names the config key); checkpoints
    are checked by ``mpcl.run.resume``."""
    for key, kind, low, strict in NUMBERS:
        value = _select(cfg, key)
        _check_number(key, value, kind, low, strict)
        if kind is int and isinstance(value, float):  # 4e4: integral (checked above)
            OmegaConf.update(cfg, key, int(value), force_add=False)
    _check_accelerator(cfg)


def _check_accelerator(cfg: DictConfig) -> None:
    """``trainer.accelerator=gpu`` (``trainer=gpu``) on a machine without CUDA: one line."""
    accelerator = _select(cfg, "trainer.accelerator")
    if str(accelerator).lower() not in ("gpu", "cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} but this machine has no CUDA GPU "
            "(torch.cuda.is_available() is False): use trainer=cpu (or trainer.accelerator=auto)"
        )


def override_key(override: str) -> str:
    """``+a.b=1`` / ``~a.b`` / ``++a.b=1`` -> ``a.b``."""
    return override.split("=", 1)[0].lstrip("+~").removeprefix("override ").strip()


def config_keys(cfg: DictConfig) -> list[str]:
    """Every dotted key of ``cfg`` (Hydra's own node left out), parents included."""
    keys: list[str] = []

    def walk(node, prefix: str) -> None:
        for k in node.keys() if isinstance(node, DictConfig) else ():
            if not prefix and k == "hydra":
                continue
            key = f"{prefix}{k}"
            keys.append(key)
            child = node._get_node(k)
            if isinstance(child, DictConfig):
                walk(child, key + ".")

    walk(cfg, "")
    return keys


def hydra_error_line(error: Exception, candidates: Iterable[str] = ()) -> str:
    """One line for Hydra's multi-line composition errors; an unknown key gets the closest
    valid keys (``candidates``, e.g. ``config_keys`` of the config without the bad override)."""
    text = str(error).strip()
    candidates = list(candidates)

    def close_to(key: str) -> list[str]:
        return difflib.get_close_matches(key, [c for c in candidates if c != key], 3, 0.6)

    m = re.match(r"Could not override '([^']+)'", text)
    if m:
        key = m.group(1)
        close = close_to(key)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        return f"unknown config key '{key}': {hint}(a new key needs a +: +{key}=...)"
    m = re.match(r"Could not delete from config\. '([^']+)' does not exist", text)
    if m:
        key = m.group(1)
        close = close_to(key)
        hint = f": did you mean {' or '.join(close)}?" if close else ""
        return f"cannot delete unknown config key '{key}'{hint}"
    lines = []
    for line in text.splitlines():
        if not line.strip() or line.startswith(("See https://", "Config search path")):
            break
        lines.append(line.strip())
    return " ".join(lines) or type(error).__name__
