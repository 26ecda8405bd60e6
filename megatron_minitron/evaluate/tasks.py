"""Downstream tasks read from local files in the standard shapes, and built-in ones made from the
held-out Shakespeare plays (no evaluation set ships offline).

- cloze (LAMBADA format): JSONL lines {"text": ...}; the last word is the target; accuracy is
  the whole word predicted greedily.
- multiple choice (HellaSwag / ARC / MMLU style): JSONL lines {"context", "choices", "label"}; or
  Winogrande style {"contexts", "continuation", "label"} (one context per option). acc: the
  highest log-likelihood; acc_norm: log-likelihood per character of the scored text (lm-eval's
  acc_norm). Zero- or few-shot: K solved examples from the same file (seeded) go before each
  context.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from megatron_minitron.config import ConfigError
from megatron_minitron.data.jsonl import jsonl_objects
from megatron_minitron.data.tokenizer import Tokenizer
from megatron_minitron.evaluate.loglik import Request, encode_pair


@dataclass
class ChoiceItem:
    contexts: list[str]  # one per option (the same string repeated for context-shared tasks)
    continuations: list[str]
    label: int


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"task file {path} not found")
    rows = [row | {"_where": where} for where, row in jsonl_objects(path)]
    if not rows:
        raise ConfigError(f"task file {path} holds no items")
    return rows


def cloze_items(rows: list[dict]) -> list[tuple[str, str]]:
    """(context, " last-word") per row."""
    out = []
    for r in rows:
        text = r.get("text")
        if not isinstance(text, str) or len(text.strip().split(" ")) < 2:
            raise ConfigError(f"{r['_where']}: a cloze item needs a \"text\" of two or more words")
        context, word = text.strip().rsplit(" ", 1)
        out.append((context, " " + word))
    return out


def choice_items(rows: list[dict]) -> list[ChoiceItem]:
    out = []
    for r in rows:
        label = r.get("label")
        if "contexts" in r:  # Winogrande style: the options differ in the context
            contexts, conts = r["contexts"], [r.get("continuation")] * len(r["contexts"])
        else:
            contexts, conts = [r.get("context")] * len(r.get("choices") or []), r.get("choices")
        if not conts or not all(isinstance(x, str) for x in [*contexts, *conts]):
            raise ConfigError(f"{r['_where']}: needs \"context\" and \"choices\" (strings), or "
                              "\"contexts\" and \"continuation\"")
        if not isinstance(label, int) or isinstance(label, bool) or \
                not 0 <= label < len(conts):
            raise ConfigError(f"{r['_where']}: label {label!r} out of range for "
                              f"{len(conts)} options")
        out.append(ChoiceItem(list(contexts), list(conts), label))
    return out


def with_fewshot(items: list[ChoiceItem], k: int, seed: int) -> list[ChoiceItem]:
    """Each item preceded by k other solved items of the same file, drawn by seed."""
    if k == 0:
        return items
    if k >= len(items):
        raise ConfigError(f"{k}-shot needs more than {k} items; the task has {len(items)}")
    rng = random.Random(seed)
    out = []
    for i, it in enumerate(items):
        shots = rng.sample([j for j in range(len(items)) if j != i], k)
        prefix = "".join(items[j].contexts[items[j].label] + items[j].continuations[items[j].label]
                         + "\n\n" for j in shots)
        out.append(ChoiceItem([prefix + c for c in it.contexts], it.continuations, it.label))
    return out


def choice_requests(tok: Tokenizer, items: list[ChoiceItem]) -> list[Request]:
    return [encode_pair(tok, c, x) for it in items
            for c, x in zip(it.contexts, it.continuations, strict=True)]


def choice_metrics(items: list[ChoiceItem], logliks: list[float]) -> dict:
    acc = acc_norm = 0
    k = 0
    for it in items:
        ll = logliks[k:k + len(it.continuations)]
        k += len(it.continuations)
        acc += max(range(len(ll)), key=ll.__getitem__) == it.label
        norm = [v / max(len(x), 1) for v, x in zip(ll, it.continuations, strict=True)]
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == it.label
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "items": len(items)}


def cloze_metrics(results: list[tuple[float, bool]]) -> dict:
    n = len(results)
    return {"acc": sum(g for _, g in results) / n,
            "perplexity": math.exp(-sum(ll for ll, _ in results) / n), "items": n}


# --- built-in tasks from the held-out plays ------------------------------------------------------

_SPEECH = re.compile(r"^[A-Z][A-Za-z .']+\.?$")  # a speaker's name alone on a line


def _play_lines(path: Path) -> list[str]:
    """The verse and prose lines of a play (headings, stage directions, speaker names left out)."""
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if (len(line.split()) >= 4 and not line.startswith(("#", "[", "_", "*", ">"))
                and not _SPEECH.match(line)):
            lines.append(line)
    return lines


def builtin_rows(name: str, n: int = 200, seed: int = 1234) -> list[dict]:
    """`shakespeare-cloze`: 3 lines of context then a line whose last word is the target;
    `shakespeare-next`: 3 lines, then which of 4 lines comes next (3 drawn from elsewhere in the
    same play). Deterministic for a seed."""
    from megatron_minitron.data.demo import held_out_plays

    if name not in BUILTIN_TASKS:
        raise ConfigError(f"unknown built-in task {name!r} ({', '.join(BUILTIN_TASKS)})")
    rng = random.Random(seed)
    plays = [_play_lines(p) for p in held_out_plays()]
    rows = []
    while len(rows) < n:
        lines = plays[len(rows) % len(plays)]
        i = rng.randrange(3, len(lines) - 1)
        context = "\n".join(lines[i - 3:i]) + "\n"
        if name == "shakespeare-cloze":
            target = lines[i].rstrip(".,;:!?'")
            if len(target.split()) >= 4 and target.split()[-1].isalpha():
                rows.append({"text": context + target})
            continue
        wrong = rng.sample([j for j in range(len(lines)) if abs(j - i) > 3], 3)
        choices = [lines[j] for j in wrong]
        label = rng.randrange(4)
        choices.insert(label, lines[i])
        rows.append({"context": context, "choices": choices, "label": label})
    return [r | {"_where": f"{name}[{k}]"} for k, r in enumerate(rows)]


BUILTIN_TASKS = ("shakespeare-cloze", "shakespeare-next")
