"""The ``mobilemoe`` model for EleutherAI's lm-evaluation-harness (``pip install lm-eval``).

Importing this module registers the class under the name ``mobilemoe``. lm-eval has no plugin
discovery for models, so its own ``lm_eval`` command cannot see it; use this module's entry point,
which registers the model and then runs lm-eval's CLI with the same arguments::

    python -m mobilemoe.eval.harness run --model mobilemoe --model_args path=CKPT,batch_size=8 \\
        --tasks arc_easy --include_path my_tasks/

or, from Python, ``lm_eval.simple_evaluate(model="mobilemoe", model_args="path=CKPT", ...)`` after
``import mobilemoe.eval.harness``.

All three request types go through :class:`~mobilemoe.eval.lm.EvalLM`, i.e. the very scorer
``mobilemoe eval`` uses, so a task run both ways gives the same numbers.
"""

from __future__ import annotations

import sys
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from mobilemoe.eval.lm import EvalLM, load_eval_lm
from mobilemoe.eval.perplexity import perplexity_ids

_TRUE = {"1", "true", "yes", "on"}


@register_model("mobilemoe")
class MobileMoELM(LM):
    """lm-eval adapter. ``model_args``: ``path`` (checkpoint dir), ``batch_size``, ``max_length``,
    ``dtype`` (float32|bfloat16), ``tokenizer``, ``max_gen_toks``, ``device``; or pass ``lm=EvalLM`` from
    Python. Generation is greedy: sampling arguments in ``gen_kwargs`` are ignored."""

    def __init__(self, path: str | None = None, batch_size: int | str = 8, max_length: int | str | None = None,
                 dtype: str | None = None, tokenizer: str | None = None, max_gen_toks: int | str = 256,
                 device: str | None = None, lm: EvalLM | None = None, progress: bool | str = False,
                 **_: Any) -> None:
        super().__init__()
        if lm is None:
            if not path:
                raise ValueError("mobilemoe: model_args needs path=CHECKPOINT_DIR")
            import torch

            torch_dtype = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
            if device and device.startswith("cuda") and not torch.cuda.is_available():
                device = "cpu"  # lm-eval's CLI defaults to cuda
            bs = 8 if str(batch_size).startswith("auto") else int(batch_size)
            lm = load_eval_lm(path, batch_size=bs, max_length=int(max_length) if max_length else None,
                              dtype=torch_dtype, tokenizer=tokenizer, device=device or "cpu")
        self.lm = lm
        self.lm.progress = str(progress).lower() in _TRUE
        self.max_gen_toks = int(max_gen_toks)
        self.path = path

    # lm-eval reads these
    @property
    def eot_token_id(self) -> int:
        return self.lm.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.lm.max_length

    @property
    def tokenizer_name(self) -> str:
        return self.lm.tokenizer.name.replace("/", "__")

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(req.args[:2]) for req in requests]
        results = self.lm.loglikelihood(pairs, desc="lm-eval loglikelihood")
        out = []
        for req, r in zip(requests, results):
            answer = (r.logprob, r.is_greedy)
            self.cache_hook.add_partial("loglikelihood", req.args, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood: max-length windows (stride = window) after the prefix token."""
        out = []
        for req in requests:
            (text,) = req.args[:1]
            ids = [self.lm.prefix_token_id] + self.lm.encode(text)
            nll, _, _, _ = perplexity_ids(self.lm, ids) if len(ids) > 1 else (0.0, 0, 0, False)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), -nll)
            out.append(-nll)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args[:2]
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            text = self.lm.generate(context, max_new_tokens=max_new, stop=until)  # greedy (sampling ignored)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def get_model_info(self) -> dict:
        return {"model": "mobilemoe", "path": self.path}


def main(argv: list[str] | None = None) -> None:
    """``python -m mobilemoe.eval.harness [run] ARGS``: lm-eval's CLI with the model registered."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    saved, sys.argv = sys.argv, ["lm-eval"] + argv
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
