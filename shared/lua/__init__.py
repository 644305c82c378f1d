"""Lua scripts, one per file, loaded once per client (EVALSHA with a fallback to EVAL)."""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def load_lua(name: str) -> str:
    return resources.files(__name__).joinpath(f"{name}.lua").read_text(encoding="utf-8")
