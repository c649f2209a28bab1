"""The scoring core: a model + tokenizer pair that scores continuations and generates text.

:class:`EvalLM` wraps the reference :class:`~mobilemoe.model.MobileMoEForCausalLM` (or anything with
the same ``forward(ids, start_pos, cache)`` contract) and its tokenizer. Every evaluation in this
package goes through three methods:

* :meth:`EvalLM.loglikelihood` - ``(context, continuation)`` string pairs -> (sum of the
  continuation tokens' log-probabilities, whether greedy decoding reproduces them). Batched: the
  requests are sorted by length, right-padded and scored in one forward per batch.
* :meth:`EvalLM.token_logprobs` - per-token log-probabilities of a token window (perplexity).
* :meth:`EvalLM.generate` - greedy continuation of a prompt through a pluggable ``generate_fn``.

Tokenization follows lm-evaluation-harness: trailing whitespace of the context moves to the
continuation, the pair is encoded whole and split at the context's token count, and every sequence
starts with a prefix token (EOS by default: pretraining shards separate documents with EOS, so "just
after an EOS" is "the start of a document").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from mobilemoe.data.tokenizer import Tokenizer
from mobilemoe.errors import MobileMoEError


class EvalError(MobileMoEError):
    """Bad evaluation input (unknown task, missing data, malformed item); the message says which."""


# A streaming generator: (prompt token ids, max new tokens) -> yields new token ids one at a time.
# The caller stops consuming when it sees EOS or a stop string, so an implementation may be lazy.
# The reference one is :func:`reference_generate`; a faster runtime engine can be passed instead.
GenerateFn = Callable[[Sequence[int], int], Iterator[int]]


def reference_generate(model: torch.nn.Module) -> GenerateFn:
    """Greedy decoding on the reference model with its static KV cache (one prompt at a time)."""

    max_pos = model.config.max_position_embeddings

    @torch.inference_mode()
    def generate(prompt: Sequence[int], max_new_tokens: int) -> Iterator[int]:
        ids = list(prompt)[-(max_pos - 1):]  # keep room for at least one new token
        budget = min(max_new_tokens, max_pos - len(ids))
        if budget <= 0:
            return
        device = model.model.embed_tokens.weight.device
        cache = model.new_cache(1, len(ids) + budget)
        x = torch.tensor([ids], dtype=torch.long, device=device)
        pos = 0
        for _ in range(budget):
            logits = model(x, start_pos=pos, cache=cache, last_only=True).logits
            pos += x.shape[1]
            nxt = int(logits[0, -1].argmax())
            yield nxt
            x = torch.tensor([[nxt]], dtype=torch.long, device=device)

    return generate


@dataclass
class LoglikelihoodResult:
    logprob: float  # sum of log p(continuation token) in nats
    is_greedy: bool  # argmax at every continuation position equals the continuation token
    num_tokens: int  # continuation tokens scored


class EvalLM:
    """A model + tokenizer to evaluate. Build with :func:`load_eval_lm` or directly.

    ``max_length`` caps the tokens of one forward (default: the model's max positions); longer
    requests are truncated from the left. ``batch_size`` is the number of sequences per forward.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, *, batch_size: int = 8,
                 max_length: int | None = None, prefix_token_id: int | None = None,
                 generate_fn: GenerateFn | None = None, progress: bool = False) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        limit = model.config.max_position_embeddings
        self.max_length = min(int(max_length), limit) if max_length else limit
        if model.config.vocab_size < tokenizer.vocab_size:
            raise EvalError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the model's "
                            f"vocab_size is {model.config.vocab_size}: wrong tokenizer for this model?")
        self.prefix_token_id = tokenizer.eos_id if prefix_token_id is None else int(prefix_token_id)
        self.generate_fn = generate_fn or reference_generate(model)
        self.progress = progress
        self.logit_chunk = 1024  # positions projected to the vocabulary at once (perplexity)
        norm = getattr(getattr(model, "model", None), "norm", None)
        self._hidden_mode = isinstance(norm, torch.nn.Module) and hasattr(model, "output_weight")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ tokenization
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids with the prefix token, continuation ids), split the lm-eval way."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        ctx = self.encode(context) if context else []
        whole = self.encode(context + continuation)
        cont = whole[len(ctx):]
        if whole[:len(ctx)] != ctx:  # a merge across the boundary: score the continuation alone
            cont = self.encode(continuation)
        return [self.prefix_token_id] + ctx, cont

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def loglikelihood_tokens(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                             desc: str = "scoring") -> list[LoglikelihoodResult]:
        """Score pre-tokenized ``(context_ids, continuation_ids)`` pairs (context must be non-empty)."""
        items = []
        for i, (ctx, cont) in enumerate(requests):
            if not ctx:
                raise EvalError("loglikelihood_tokens: empty context (prepend the prefix token)")
            if not cont:
                items.append((i, [], 0))
                continue
            seq = (list(ctx) + list(cont))[:-1][-self.max_length:]
            items.append((i, seq, len(cont)))
        results: list[LoglikelihoodResult | None] = [None] * len(requests)
        # Requests whose model input is identical (e.g. the " A".." D" single-token choices of one MMLU
        # question) share one row of the batch: the input is ctx + cont[:-1], the targets differ.
        groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        for i, seq, n in items:
            if n == 0:
                results[i] = LoglikelihoodResult(0.0, True, 0)
            else:
                groups.setdefault(tuple(seq), []).append((i, n))
        todo = sorted(groups.items(), key=lambda kv: -len(kv[0]))
        bar = _progress(len(todo), desc, self.progress)
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start:start + self.batch_size]
            width = len(batch[0][0])
            x = torch.full((len(batch), width), self.prefix_token_id, dtype=torch.long)
            for row, (seq, _) in enumerate(batch):
                x[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            hidden = self._final_hidden(x.to(self.device))
            for row, (seq, members) in enumerate(batch):
                kmax = min(max(n for _, n in members), len(seq))
                # log-probs of the last kmax positions only (never [B, T, V] for a big vocabulary)
                logp = F.log_softmax(self._logits(hidden[row, len(seq) - kmax:len(seq)]), dim=-1)
                for i, n in members:
                    cont = list(requests[i][1])[-min(n, len(seq)):]  # the scored tail (all unless truncated)
                    k = len(cont)
                    lp = logp[kmax - k:]
                    target = torch.tensor(cont, dtype=torch.long, device=lp.device)
                    tok_lp = lp.gather(-1, target[:, None]).squeeze(-1)
                    greedy = bool((lp.argmax(-1) == target).all())
                    results[i] = LoglikelihoodResult(float(tok_lp.double().sum()), greedy, k)
            bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests: Sequence[tuple[str, str]], desc: str = "scoring") -> list[LoglikelihoodResult]:
        """Score ``(context, continuation)`` string pairs. An empty context means "document start"."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests], desc=desc)

    @torch.inference_mode()
    def token_logprobs(self, ids: Sequence[int]) -> torch.Tensor:
        """log p(ids[t] | ids[:t]) for t = 1..len(ids)-1 from ONE forward (float64, on CPU)."""
        if len(ids) > self.max_length:
            raise EvalError(f"window of {len(ids)} tokens exceeds max_length {self.max_length}")
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        hidden = self._final_hidden(x[:, :-1])[0]
        out = []
        for start in range(0, hidden.shape[0], self.logit_chunk):  # bounded [chunk, V] at a time
            logp = F.log_softmax(self._logits(hidden[start:start + self.logit_chunk]), dim=-1)
            out.append(logp.gather(-1, x[0, 1 + start:1 + start + logp.shape[0], None]).squeeze(-1).double())
        return torch.cat(out).cpu()

    # ------------------------------------------------------------------ model access
    def _final_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [B, T, H] (or, for a model without that structure, logits [B, T, V]).

        The reference model's ``forward(last_only=True)`` projects only the last position to the
        vocabulary; a hook on its final norm captures every position's hidden state, so the scorer
        projects just the positions it scores.
        """
        if not self._hidden_mode:
            return self.model(x).logits
        norm = self.model.model.norm
        captured: list[torch.Tensor] = []
        handle = norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            self.model(x, last_only=True)
        finally:
            handle.remove()
        return captured[-1]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of final hidden states [..., H] (identity when given logits already)."""
        if not self._hidden_mode:
            return hidden.float()
        return F.linear(hidden, self.model.output_weight).float()

    # ------------------------------------------------------------------ generation
    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 256,
                 stop: Iterable[str] = (), stop_ids: Iterable[int] | None = None) -> str:
        """Greedy continuation of ``prompt`` (text, or ids used as-is) up to the first stop string."""
        ids = [self.prefix_token_id] + self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        stop = [s for s in stop if s]
        stop_ids = set(self._default_stop_ids() if stop_ids is None else stop_ids)
        out: list[int] = []
        text = ""
        for tok in self.generate_fn(ids, max_new_tokens):
            if tok in stop_ids:
                break
            out.append(tok)
            text = self.tokenizer.decode(out)
            if stop and any(s in text for s in stop):
                break
        return truncate_at_stop(text, stop)

    def _default_stop_ids(self) -> list[int]:
        """The tokenizer's EOS, the project template's turn end and every id of config.json's
        ``eos_token_id`` (the released configs give a list)."""
        ids = [self.tokenizer.eos_id]
        end = self.tokenizer.token_id("<|end|>")
        eos = getattr(self.model.config, "eos_token_id", None)
        ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        return ids + ([end] if end is not None else [])


def truncate_at_stop(text: str, stop: Iterable[str]) -> str:
    """``text`` cut at the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s:
            j = text.find(s)
            if j != -1:
                cut = min(cut, j)
    return text[:cut]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def load_eval_lm(path: str | os.PathLike, *, batch_size: int = 8, max_length: int | None = None,
                 dtype: torch.dtype | None = None, device: str = "cpu", tokenizer: str | None = None,
                 generate_fn: GenerateFn | None = None, progress: bool = False) -> EvalLM:
    """Load a checkpoint directory (float or INT4) and the ``tokenizer.json`` beside it."""
    from pathlib import Path

    from mobilemoe.checkpoint import load_model

    path = Path(path)
    if not path.is_dir():
        raise EvalError(f"{path}: not a checkpoint directory (expected config.json + *.safetensors + tokenizer.json)")
    tok_path = Path(tokenizer) if tokenizer else path / "tokenizer.json"
    if not tok_path.exists():
        raise EvalError(f"{tok_path}: tokenizer not found (evaluation needs the checkpoint's tokenizer.json; "
                        "pass tokenizer=PATH)")
    tok = Tokenizer.load(tok_path)
    model = load_model(path, dtype=dtype)
    if dtype is None and model.model.embed_tokens.weight.dtype == torch.bfloat16 and device == "cpu":
        model = model.float()  # bf16 matmuls on CPU are slow and lossy for scoring
    model = model.to(device)
    return EvalLM(model, tok, batch_size=batch_size, max_length=max_length, generate_fn=generate_fn,
                  progress=progress)
