"""The checkpoint's tokenizer: a HF `tokenizers` JSON or a sentencepiece model, one interface."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_minitron.config import ConfigError


class Tokenizer:
    def __init__(self, path: Path):
        path = Path(path)
        self.path = path
        special = {}
        cfg = path.parent / "tokenizer_config.json"
        if cfg.is_file():
            special = json.loads(cfg.read_text())
        if path.name == "tokenizer.json":
            from tokenizers import Tokenizer as HFTokenizer

            self._hf = HFTokenizer.from_file(str(path))
            self._sp = None
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        elif path.name == "tokenizer.model":
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=str(path))
            self._hf = None
            self.vocab_size = self._sp.get_piece_size()
        else:
            raise ConfigError(f"unknown tokenizer file {path}")
        self.eos_id = special.get("eos_token_id")
        self.bos_id = special.get("bos_token_id")
        # What every sequence starts with (Gemma scores 2 nats worse without its <bos>): the BOS
        # where the tokenizer config asks for it, as transformers' tokenizers add it.
        self.prefix: list[int] = []
        if special.get("add_bos_token"):
            if self.bos_id is None:
                raise ConfigError(f"{cfg}: add_bos_token is set but bos_token_id is not")
            self.prefix = [int(self.bos_id)]

    def encode(self, text: str) -> list[int]:
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False).ids
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=False)
        return self._sp.decode(ids)


def find_tokenizer_file(directory: Path) -> Path | None:
    for name in ("tokenizer.json", "tokenizer.model"):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def load_tokenizer(ckpt: Path) -> Tokenizer:
    from megatron_minitron.checkpoint.mcore import tokenizer_dir

    d = tokenizer_dir(Path(ckpt))
    f = find_tokenizer_file(d) if d else None
    if f is None:
        raise ConfigError(f"checkpoint {ckpt} carries no tokenizer (one from Megatron-LM: "
                          f"`minitron convert {ckpt} NEW --tokenizer PATH` adds one)")
    return Tokenizer(f)
