"""Flags over environment variables: one helper for both services' command lines."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings

SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def settings_from_args(
    parser: argparse.ArgumentParser, cls: type[SettingsT], argv: Sequence[str] | None
) -> SettingsT:
    """Build settings where a flag given on the command line beats the environment."""
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return cls(**overrides)
    except ValidationError as exc:
        parser.error(_readable(exc))


def _readable(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
    )
