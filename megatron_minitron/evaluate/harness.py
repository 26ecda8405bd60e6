"""lm-evaluation-harness adapter: its `LM` interface over our loaded (sharded) Megatron model, so
any lm-eval task — including ones defined in a local YAML over local JSONL — runs on a pruned
checkpoint. Optional dependency: `pip install lm-eval`.

Every rank runs lm-eval with the whole request list (the adapter reports rank 0 of 1 to lm-eval);
the scorer below splits the work over data-parallel ranks and the model over TP/PP itself.
Tokenization and scoring are `encode_pair` and `score`, the same as `minitron eval`'s own tasks,
so both give the same numbers on the same items.
"""

from __future__ import annotations

from pathlib import Path

from lm_eval.api.model import LM

from megatron_minitron.config import ConfigError
from megatron_minitron.data.tokenizer import Tokenizer
from megatron_minitron.evaluate.loglik import Request, encode_pair, score


class MinitronLM(LM):
    def __init__(self, chunks, tok: Tokenizer, seq_length: int, micro_batch_size: int = 1,
                 max_gen_toks: int = 256):
        super().__init__()
        self.chunks, self.tok = chunks, tok
        self.seq_length, self.micro_batch_size = seq_length, micro_batch_size
        self.max_gen_toks = max_gen_toks

    def _eot(self) -> int:
        """lm-eval's prefix token: BOS where the tokenizer adds one, else end-of-text."""
        if self.tok.prefix:
            return self.tok.prefix[0]
        if self.tok.eos_id is None:
            raise ConfigError("the checkpoint's tokenizer has no EOS id, needed by lm-eval for "
                              "empty contexts and rolling log-likelihoods")
        return self.tok.eos_id

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        reqs = []
        for r in requests:
            context, continuation = r.args
            if context:
                reqs.append(encode_pair(self.tok, context, continuation))
            else:  # lm-eval's convention: an empty context is the end-of-text token
                reqs.append(Request([self._eot()], self.tok.encode(continuation)))
        return score(self.chunks, reqs, self.seq_length, self.micro_batch_size)

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for r in requests:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok.encode(r.args[0]), prefix_token=self._eot(),
                max_seq_len=self.seq_length, context_len=1)]
            results = score(self.chunks, [Request(list(c), list(x)) for c, x in windows],
                            self.seq_length, self.micro_batch_size)
            out.append(sum(ll for ll, _ in results))
        return out

    def generate_until(self, requests) -> list[str]:
        from megatron_minitron.evaluate.generate import greedy

        out = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else until
            n = kwargs.get("max_gen_toks", self.max_gen_toks)
            ids = (self.tok.prefix + self.tok.encode(context))[-max(self.seq_length - n, 1):]
            text = self.tok.decode(greedy(self.chunks, ids, n, self.tok.eos_id))
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def task_manager(tasks: list[str], include: Path | None):
    """lm-eval's task index (its registry plus `include`), every task checked to be there."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include) if include else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"lm-eval tasks not found: {', '.join(unknown)}"
                          + ("" if include else " (local YAML tasks need --lm-eval-include DIR)"))
    return manager


def run_lm_eval(model: MinitronLM, tasks: list[str], manager, num_fewshot: int,
                limit: int | None) -> dict:
    import lm_eval

    return lm_eval.simple_evaluate(model=model, tasks=tasks, num_fewshot=num_fewshot,
                                   limit=limit, task_manager=manager, log_samples=False)
