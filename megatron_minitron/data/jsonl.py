"""JSONL reading with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from megatron_minitron.config import ConfigError


def jsonl_objects(path: Path) -> Iterator[tuple[str, dict]]:
    """("FILE:LINE", object) for every non-blank line; anything but a JSON object is an error."""
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ConfigError(f"{path}:{n}: expected a JSON object")
            yield f"{path}:{n}", obj
