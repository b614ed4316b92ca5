"""The data pipeline of the training stages: records -> token rows -> batches.

    records = load_records("corpus.jsonl")                        # datasets.Dataset
    rows = list(pretrain_rows(records, tokenizer, seq_len=2048))  # packed pretraining rows
    examples = sft_examples(records, tokenizer, max_length=2048)  # one conversation per example
    pairs = dpo_examples(records, tokenizer, 2048, 512)           # chosen/rejected per example
    stream = BatchStream(examples, 8, functools.partial(collate_lm, pad_id=tokenizer.pad_token_id), seed=0)

Conventions every function here keeps (the trainer and the model rely on them):

- Labels are already shifted: for input ids ``x[0..T-1]``, ``labels[t]`` is the token position ``t``
  must predict, ``x[t+1]``, or -100 (``IGNORE_INDEX``) where position ``t`` predicts nothing. So
  ``labels[t]`` is always either -100 or ``input_ids[t+1]``, and ``labels[T-1]`` is always -100 (a
  row's last token has no next token in the row, even when truncation cut one off).
- ``position_ids`` restart at 0 at the start of every document packed into a row; the model masks
  attention across documents wherever a position is 0.
- Special token ids come from the tokenizer (``tokenizer.eos_token_id``), never from constants.

Text is tokenized with ``split_special_tokens=True`` wherever it is user text (documents, prompts,
responses): a literal "</s>" in a document is text, not an eos. Only a chat template's own
rendering is parsed for special-token strings, since the template writes them on purpose.

A sequence of an SFT or DPO example starts with bos exactly when the tokenizer adds one by itself
(``tokenizer("x")`` starts with bos: Llama, SOLAR, Mistral) and a chat template has not already
written it, so training sees what ``tokenizer(prompt)`` gives at inference. Pretraining rows carry no
bos: documents are separated by eos and by the position restart.

The pipeline's parts, one module each (every public name is importable from ``training.data``):

- ``records``: ``load_records``, ``split_records``.
- ``pretraining``: ``pretrain_rows``, ``held_out_rows``.
- ``conversations``: the SOLAR prompt format (``solar_prompt``, the headers) and the chat-template path.
- ``sft``: ``sft_examples``; ``packing``: ``pack_examples``, ``packing_efficiency``.
- ``dpo``: ``dpo_examples``.
- ``batches``: ``collate_lm``, ``collate_dpo``, ``num_tokens``, ``BatchStream``, ``StreamingBatches``.
- ``tokens``: ``IGNORE_INDEX`` and the token-level helpers the others share (encoding, bos/eos, labels).
"""

from __future__ import annotations

from .batches import BatchStream, StreamingBatches, collate_dpo, collate_lm, num_tokens
from .conversations import ASSISTANT_HEADER, SYSTEM_HEADER, USER_HEADER, solar_prompt
from .dpo import dpo_examples
from .packing import pack_examples, packing_efficiency
from .pretraining import held_out_rows, pretrain_rows
from .records import load_records, split_records
from .sft import sft_examples
from .tokens import IGNORE_INDEX

__all__ = [
    "ASSISTANT_HEADER",
    "IGNORE_INDEX",
    "SYSTEM_HEADER",
    "USER_HEADER",
    "BatchStream",
    "StreamingBatches",
    "collate_dpo",
    "collate_lm",
    "dpo_examples",
    "held_out_rows",
    "load_records",
    "num_tokens",
    "pack_examples",
    "packing_efficiency",
    "pretrain_rows",
    "sft_examples",
    "solar_prompt",
    "split_records",
]
