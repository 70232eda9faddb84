"""User-facing errors.

Every problem a user can cause (bad model name, missing data, a policy that does not fit, ...)
raises an :class:`MpqkitError` whose message is one line naming the problem and the fix. The CLI
prints that line and exits with status 2; library users catch the exception.
"""

from __future__ import annotations


class MpqkitError(Exception):
    """A problem with the user's input, reported as one line that names the problem and the fix."""

    exit_code = 2


class ConfigError(MpqkitError):
    """An option, config file or combination of options that cannot work."""


class DataError(MpqkitError):
    """A dataset that is unknown, missing, empty or unreadable."""


class ModelError(MpqkitError):
    """A model name or factory that cannot be built."""


class PolicyError(MpqkitError):
    """A policy that is malformed or does not fit the model."""


class CheckpointError(MpqkitError):
    """A checkpoint that is missing, corrupt or does not match the model."""


class BudgetError(MpqkitError):
    """A complexity budget that cannot be met."""


class NonFiniteError(ConfigError):
    """A loss, gradient or weight that became NaN or infinite (the run diverged)."""


def check_choice(name: str, value: str, choices: tuple[str, ...] | list[str]) -> str:
    """``value`` if it is one of ``choices``, else a one-line :class:`ConfigError`."""
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is unknown: use one of {', '.join(choices)}")
    return value


def check_betas(name: str, betas: object) -> tuple[float, float]:
    """Two Adam betas in [0, 1), else a one-line :class:`ConfigError`."""
    try:
        out = tuple(float(b) for b in (betas.split(",") if isinstance(betas, str) else betas))
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={betas!r} must be two numbers in [0, 1), e.g. "
                          "0.9,0.999") from None
    if len(out) != 2 or not all(0 <= b < 1 for b in out):
        raise ConfigError(f"{name}={list(out)} must be two numbers in [0, 1), e.g. 0.9,0.999")
    return out  # type: ignore[return-value]
