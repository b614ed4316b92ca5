"""The ``solar`` model of EleutherAI's lm-evaluation-harness: our model and kernels behind its ``LM`` API.

lm-eval 0.4.13 finds a model name only in its own registry (no plugin entry points), so the name
``solar`` exists once this module is imported. From a shell, run the harness through this module,
which registers ``solar`` and then hands its arguments to lm-eval's own command line::

    python -m solar_kernels.lm_eval_adapter run --model solar --model_args pretrained=DIR \\
        --tasks hellaswag --device cuda --batch_size 8

From Python, import it before asking for the model::

    import lm_eval, solar_kernels.lm_eval_adapter
    lm_eval.simple_evaluate(model="solar", model_args="pretrained=DIR", tasks=["hellaswag"])

Model arguments (``--model_args key=value,...``): ``pretrained`` (a Hugging Face checkpoint folder,
loaded as ``solar generate`` loads it: ``load_pretrained`` and a tokenizer that never runs remote
code), ``dtype`` (float32/float16/bfloat16, default the checkpoint's), ``backend`` (torch, triton,
cuda, auto), ``max_length`` (context tokens, default the config's ``max_position_embeddings``),
``max_gen_toks`` (default 256), ``add_bos_token`` (default False, as the harness's ``hf`` model),
``prefix_token_id`` (the token an empty context is replaced by; default bos, else eos).

- ``loglikelihood``: the summed log-prob of each continuation given its context through
  ``sequence_logprobs`` on the final hidden states (``evaluate.continuation_logprobs``); ``is_greedy``
  from the argmax of the continuation positions' logits only.
- ``loglikelihood_rolling``: the harness's disjoint rolling windows of ``max_length`` tokens, each
  scored the same way, summed per document.
- ``generate_until``: ``solar_kernels.model.generate`` (greedy unless ``do_sample`` with a
  temperature), up to ``max_gen_toks`` new tokens or eos, then cut before the first stop string of
  ``until`` (default: the eos token's text). Requests with equal generation options share a batch.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from lm_eval import models as _lm_eval_models  # noqa: F401  the harness's own names, before ours is added
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from .checkpoint import CheckpointReader
from .evaluate import continuation_logprobs

logger = logging.getLogger(__name__)

_SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p")


def _positive_int(name: str, value) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"solar model: {name} must be a positive integer, got {value!r}"
            + (" (the solar model does not search batch sizes)" if name == "batch_size" else "")
        )
    return value


@register_model("solar")
class SolarLM(TemplateLM):
    """A ``CausalLM`` checkpoint scored with the fused log-prob kernels (one process, one device)."""

    def __init__(
        self,
        pretrained: str,
        *,
        device: str | None = None,
        dtype: str | None = None,
        backend: str | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool = False,
        prefix_token_id: int | None = None,
    ) -> None:
        super().__init__()
        from .chat import load_tokenizer
        from .model.hf import load_pretrained

        path = Path(str(pretrained))
        self.batch_size = _positive_int("batch_size", 1 if batch_size is None else batch_size)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line passes cuda:0 unless told otherwise
            raise ValueError(f"solar model: device {device!r}, but torch sees no CUDA device; pass --device cpu")
        CheckpointReader(path)  # one-line errors for a missing folder or one that is not a checkpoint
        self.tokenizer = load_tokenizer(path)
        self.model = load_pretrained(path, device=device, dtype=dtype, backend=backend).eval()
        self._device = torch.device(device)
        self._max_length = _positive_int("max_length", max_length or self.model.config.max_position_embeddings)
        self.add_bos_token = bool(add_bos_token)
        self.custom_prefix_token_id = prefix_token_id
        self.pretrained = str(path)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"solar model: {path}: the tokenizer has no eos token; expected one to end generation")

    # ------------------------------------------------------------------------------ tokenization

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return list(self.tokenizer(string, add_special_tokens=special).input_ids)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    # ------------------------------------------------------------------------------- requests

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        results = continuation_logprobs(
            self.model, pairs, batch_size=self.batch_size, max_length=self.max_length, greedy=True
        )
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, request in enumerate(requests):
            (string,) = request.args
            for context, predicted in map(
                make_disjoint_window,
                get_rolling_token_windows(self.tok_encode(string), self.prefix_token_id, self.max_length, 1),
            ):
                windows.append((context, predicted))
                owners.append(index)
        totals = [0.0] * len(requests)
        scores = continuation_logprobs(self.model, windows, batch_size=self.batch_size, max_length=self.max_length)
        for index, (logprob, _) in zip(owners, scores):
            totals[index] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def _generation_options(self, gen_kwargs: dict) -> tuple[list[str], int, float, int | None, float | None]:
        options = dict(gen_kwargs or {})
        until = options.pop("until", None)
        stops = [until] if isinstance(until, str) else list(until or [])
        if not stops:
            stops = [self.tokenizer.decode([self.eot_token_id])]
        max_new = _positive_int("max_gen_toks", options.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(options.pop("do_sample", False))
        temperature = float(options.pop("temperature", 0.0) or 0.0) if do_sample else 0.0
        top_k, top_p = options.pop("top_k", None), options.pop("top_p", None)
        if options:
            logger.warning("solar model: ignoring generation options %s", sorted(options))
        return stops, max_new, temperature, top_k, top_p

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from .model import generate

        outputs: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        options = []
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            stops, max_new, temperature, top_k, top_p = self._generation_options(gen_kwargs)
            if max_new >= self.max_length:
                raise ValueError(
                    f"solar model: max_gen_toks={max_new} leaves no room for the context in "
                    f"max_length={self.max_length}; expected max_gen_toks < max_length"
                )
            options.append((context, stops))
            groups.setdefault((max_new, temperature, top_k, top_p), []).append(index)
        for (max_new, temperature, top_k, top_p), indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                # The context's end is kept: max_new tokens must still fit in max_length.
                prompts = [
                    self.tok_encode(options[i][0])[-(self.max_length - max_new) :] or [self.prefix_token_id]
                    for i in batch
                ]
                new_tokens = generate(
                    self.model,
                    prompts,
                    max_new,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    eos_token_id=self.eot_token_id,
                    pad_token_id=self.eot_token_id,
                )
                for i, tokens in zip(batch, new_tokens):
                    text = self.tok_decode([t for t in tokens if t != self.eot_token_id])
                    for stop in options[i][1]:
                        if stop:
                            text = text.split(stop, 1)[0]
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``solar`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
