"""GGUF (llama.cpp) -> Hugging Face checkpoint directory, for Llama-architecture models.

``convert_gguf(src, dst)`` reads a ``.gguf`` file with the ``gguf`` package, dequantizes each
tensor (``gguf.quants.dequantize``; F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants
Q2_K..Q6_K), undoes llama.cpp's q/k row order, and writes, atomically and sharded through
``solar_kernels.checkpoint``:

- ``config.json`` and ``generation_config.json`` from the ``llama.*`` and ``tokenizer.ggml.*_id`` keys;
- the weights in Hugging Face names, float32 by default (every supported type dequantizes exactly
  into float32; ``dtype`` may ask for float16 or bfloat16);
- ``tokenizer.json``, ``tokenizer_config.json`` (with the GGUF's ``tokenizer.chat_template``) and
  ``special_tokens_map.json`` for a byte-level BPE vocabulary (``tokenizer.ggml.model`` "gpt2"), with
  the pre-tokenizer the GGUF names in ``tokenizer.ggml.pre`` and the special ids it gives.

The q/k order: llama.cpp's converter stores each head's rows of ``q_proj``/``k_proj`` as
``[head, 2, head_dim/2]`` -> ``[head, head_dim/2, 2]`` (its rotary pairs adjacent dimensions,
Hugging Face's pairs ``j`` with ``j + head_dim/2``); the inverse regroups them back.

Reading uses a memory map and converts one tensor at a time; only the shard being filled is held.
Everything is checked (architecture, tokenizer, every tensor's type, name and shape, the destination)
before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

import torch

from .checkpoint import (
    ShardWriter,
    check_destination,
    output_directory,
    parse_dtype,
    set_config_dtype,
    write_config,
    write_json,
)
from .model.config import ModelConfig

logger = logging.getLogger(__name__)

# GGML tensor types whose dequantization gguf.quants implements and the tests cover.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# GGUF tensor name -> Hugging Face name ("{i}": the layer index).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# tokenizer.ggml.pre -> the pre-tokenizer llama.cpp applies for it (its llama-vocab.cpp groups).
# "digits": each digit on its own, then GPT-2's byte-level regex (SmolLM, StarCoder, ...);
# "gpt2": GPT-2's byte-level regex alone; "llama3": Llama 3's regex (digits in groups of up to 3).
PRE_TOKENIZERS = {
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"), "digits"),
    **dict.fromkeys(("gpt-2", "gpt2", "default", "mpt", "olmo", "jais"), "gpt2"),
    **dict.fromkeys(("llama-bpe", "llama3"), "llama3"),
}
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GGUF token types (gguf.TokenType): CONTROL tokens are special, USER_DEFINED ones are added tokens.
_CONTROL, _USER_DEFINED = 3, 4


class GGUFError(ValueError):
    """A GGUF file this converter cannot convert (one line: what was expected, what was given)."""


@dataclasses.dataclass
class ConvertReport:
    path: Path
    num_layers: int
    num_tensors: int
    bytes_written: int
    seconds: float


def _import_gguf():
    try:
        import gguf
    except ImportError as error:
        raise GGUFError(f"reading GGUF files needs the gguf package (pip install gguf): {error}") from None
    return gguf


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _require(reader, key: str, src: Path):
    value = _field(reader, key)
    if value is None:
        raise GGUFError(f"{src}: GGUF key {key!r} is missing; expected it in a llama-architecture file")
    return value


def _open(src: Path):
    gguf = _import_gguf()
    if not src.is_file():
        raise GGUFError(f"{src}: expected a .gguf file, it does not exist or is not a file")
    with open(src, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{src}: not a GGUF file (expected the magic b'GGUF', got {magic!r})")
    try:
        return gguf.GGUFReader(src, "r")
    except (ValueError, OSError, KeyError, IndexError) as error:
        raise GGUFError(f"{src}: unreadable GGUF file ({error})") from None


def gguf_config(reader, src: Path) -> ModelConfig:
    """The model's config from a GGUF's metadata (refuses what the model cannot represent)."""
    architecture = _field(reader, "general.architecture")
    if architecture != "llama":
        raise GGUFError(f"{src}: unsupported architecture {architecture!r}; expected 'llama'")
    scaling = _field(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise GGUFError(f"{src}: RoPE scaling {scaling!r} is not supported; expected none (default RoPE)")
    experts = _field(reader, "llama.expert_count", 0)
    if experts:
        raise GGUFError(f"{src}: a mixture of {experts} experts is not supported; expected a dense llama model")
    hidden = int(_require(reader, "llama.embedding_length", src))
    heads = int(_require(reader, "llama.attention.head_count", src))
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // heads))
    value_dim = int(_field(reader, "llama.attention.value_length", head_dim))
    rotary_dim = int(_field(reader, "llama.rope.dimension_count", head_dim))
    if value_dim != head_dim or rotary_dim != head_dim:
        raise GGUFError(
            f"{src}: key, value and rotary widths must be equal; got key {head_dim}, value {value_dim}, "
            f"rotary {rotary_dim}"
        )
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = _field(reader, "llama.vocab_size") or len(tokens) or (int(embedding.shape[-1]) if embedding else 0)
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_require(reader, "llama.feed_forward_length", src)),
        num_layers=int(_require(reader, "llama.block_count", src)),
        num_heads=heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=_float32(_field(reader, "llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, "llama.context_length", 4096)),
        rms_norm_eps=_float32(_require(reader, "llama.attention.layer_norm_rms_epsilon", src)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_optional_int(_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=_optional_int(_field(reader, "tokenizer.ggml.eos_token_id")),
        pad_token_id=_optional_int(_field(reader, "tokenizer.ggml.padding_token_id")),
    )


def _float32(value) -> float:
    """A GGUF float32 as the shortest decimal that rounds to it (1e-05, not 9.999999747378752e-06)."""
    import numpy as np

    return float(str(np.float32(value)))


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, None for a name this converter does not know."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    block, _, rest = gguf_name.partition(".")
    layer, _, suffix = rest.partition(".")
    if block == "blk" and layer.isdigit() and suffix in _LAYER_NAMES:
        return f"model.layers.{int(layer)}.{_LAYER_NAMES[suffix]}"
    return None


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape of every tensor the checkpoint must hold."""
    d, q_out, kv_out = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    per_layer = {
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q_out, d),
        "self_attn.k_proj.weight": (kv_out, d),
        "self_attn.v_proj.weight": (kv_out, d),
        "self_attn.o_proj.weight": (d, q_out),
        "mlp.gate_proj.weight": (config.intermediate_size, d),
        "mlp.up_proj.weight": (config.intermediate_size, d),
        "mlp.down_proj.weight": (d, config.intermediate_size),
    }
    for i in range(config.num_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def unpermute_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undoes llama.cpp's q/k permutation: rows [head, head_dim/2, 2] -> [head, 2, head_dim/2]."""
    rows, cols = weight.shape
    # [H*hd, d] -> [H, hd/2, 2, d] -> [H, 2, hd/2, d] -> [H*hd, d]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _plan_tensors(reader, config: ModelConfig, src: Path) -> list:
    """(Hugging Face name, GGUF tensor) pairs in the model's order, every type and shape checked."""
    by_name, unknown, unsupported = {}, [], []
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            unknown.append(tensor.name)
            continue
        if tensor.tensor_type.name not in SUPPORTED_TYPES:
            unsupported.append(f"{tensor.name} ({tensor.tensor_type.name})")
        by_name[name] = tensor
    if unknown:
        raise GGUFError(
            f"{src}: tensors a llama model does not have: {', '.join(unknown[:5])}"
            f"{'...' if len(unknown) > 5 else ''}; expected only {', '.join(_GLOBAL_NAMES)} and blk.N.*"
        )
    if unsupported:
        raise GGUFError(
            f"{src}: unsupported tensor type(s): {', '.join(unsupported[:5])}"
            f"{'...' if len(unsupported) > 5 else ''}; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    shapes = expected_shapes(config)
    missing = [name for name in shapes if name not in by_name]
    if missing:
        raise GGUFError(
            f"{src}: tensors missing for a {config.num_layers}-layer model: {', '.join(missing[:5])}"
            f"{'...' if len(missing) > 5 else ''}"
        )
    for name, shape in shapes.items():
        given = tuple(int(n) for n in reversed(by_name[name].shape))  # GGUF lists dimensions innermost first
        if given != shape:
            raise GGUFError(f"{src}: tensor {by_name[name].name} has shape {given}, the metadata implies {shape}")
    return [(name, by_name[name]) for name in shapes]


def dequantize(tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A GGUF tensor as a float32 torch tensor of ``shape`` (Hugging Face order), in memory of its own."""
    import numpy as np
    from gguf.quants import dequantize as gguf_dequantize

    values = gguf_dequantize(tensor.data, tensor.tensor_type)
    values = np.require(values, dtype=np.float32, requirements=["C", "W"])  # copies the read-only memory map
    return torch.from_numpy(values).reshape(shape)


# ------------------------------------------------------------------------------------------ tokenizer


def _token_strings(reader, src: Path) -> tuple[list[str], list[int]]:
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFError(f"{src}: no tokenizer.ggml.tokens; expected the vocabulary in the file")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    return list(tokens), [int(t) for t in types]


def check_tokenizer(reader, src: Path) -> str:
    """The pre-tokenizer kind (see ``PRE_TOKENIZERS``) for the GGUF's tokenizer, or a one-line error."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"{src}: tokenizer.ggml.model {model!r} is not supported; expected 'gpt2' (byte-level BPE)")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(
            f"{src}: tokenizer.ggml.pre {pre!r} is not supported; expected one of {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    _token_strings(reader, src)
    if not _field(reader, "tokenizer.ggml.merges"):
        raise GGUFError(f"{src}: no tokenizer.ggml.merges; expected the BPE merges of a 'gpt2' tokenizer")
    return PRE_TOKENIZERS[pre]


def build_tokenizer(reader, src: Path):
    """The GGUF's byte-level BPE tokenizer as a ``tokenizers.Tokenizer``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = check_tokenizer(reader, src)
    tokens, types = _token_strings(reader, src)
    merges = []
    for merge in _field(reader, "tokenizer.ggml.merges"):
        left, space, right = merge.partition(" ")
        if not space or " " in right:
            raise GGUFError(f"{src}: BPE merge {merge!r} is not two tokens separated by one space")
        merges.append((left, right))
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=kind != "llama3")
    if kind == "digits":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif kind == "llama3":
        split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, kind_ in enumerate(types) if kind_ == _CONTROL]
    )
    tokenizer.add_tokens(
        [
            AddedToken(tokens[i], special=False, normalized=False)
            for i, kind_ in enumerate(types)
            if kind_ == _USER_DEFINED
        ]
    )
    bos = _optional_int(_field(reader, "tokenizer.ggml.bos_token_id"))
    eos = _optional_int(_field(reader, "tokenizer.ggml.eos_token_id"))
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        first = [f"{tokens[bos]}:0"] * add_bos + ["$A:0"] + [f"{tokens[eos]}:0"] * add_eos
        second = [f"{tokens[bos]}:1"] * add_bos + ["$B:1"] + [f"{tokens[eos]}:1"] * add_eos
        special = sorted({(tokens[i], i) for i, on in ((bos, add_bos), (eos, add_eos)) if on}, key=lambda t: t[1])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join(first), pair=" ".join(first + second), special_tokens=special
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def write_tokenizer(reader, src: Path, directory: Path, config: ModelConfig) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
    tokenizer = build_tokenizer(reader, src)
    tokenizer.save(str(directory / "tokenizer.json"))
    tokens, types = _token_strings(reader, src)
    special = {}
    for role, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        index = _optional_int(_field(reader, f"tokenizer.ggml.{key}"))
        if index is not None:
            if not 0 <= index < len(tokens):
                raise GGUFError(f"{src}: tokenizer.ggml.{key} is {index}, expected an id below {len(tokens)}")
            special[role] = tokens[index]
    added = {
        str(i): {
            "content": tokens[i],
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": kind == _CONTROL,
        }
        for i, kind in enumerate(types)
        if kind in (_CONTROL, _USER_DEFINED)
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.max_position_embeddings,
        "added_tokens_decoder": added,
        **special,
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tokenizer_config["chat_template"] = template
    write_json(directory / "tokenizer_config.json", tokenizer_config)
    write_json(directory / "special_tokens_map.json", special)


# ----------------------------------------------------------------------------------------- conversion


def convert_gguf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    force: bool = False,
    max_shard_size: int | str = "5GB",
    dtype: str | torch.dtype | None = None,
) -> ConvertReport:
    """Converts the llama-architecture GGUF file ``src`` into the Hugging Face directory ``dst``
    (atomically; an existing ``dst`` only with ``force``); ``dtype`` None writes float32."""
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    out_dtype = parse_dtype(dtype) or torch.float32
    check_destination(dst, [src])
    if dst.exists() and not force:
        raise GGUFError(f"{dst} already exists (pass force=True / --force to replace it)")
    reader = _open(src)
    config = gguf_config(reader, src)
    plan = _plan_tensors(reader, config, src)
    check_tokenizer(reader, src)
    shapes = expected_shapes(config)
    element = torch.empty((), dtype=out_dtype).element_size()
    expected_bytes = sum(torch.Size(shapes[name]).numel() for name, _ in plan) * element
    with output_directory(dst, force=force, expected_bytes=expected_bytes, tool="convert_gguf") as tmp:
        write_config(tmp, set_config_dtype(config.to_hf_config(), out_dtype), source=str(src))
        write_json(tmp / "generation_config.json", config.generation_config())
        write_tokenizer(reader, src, tmp, config)
        writer = ShardWriter(tmp, max_shard_size)
        for name, tensor in plan:
            weight = dequantize(tensor, shapes[name])
            if name.endswith("q_proj.weight"):
                weight = unpermute_rows(weight, config.num_heads)
            elif name.endswith("k_proj.weight"):
                weight = unpermute_rows(weight, config.num_kv_heads)
            writer.add(name, weight.to(out_dtype))
        writer.finish()
    seconds = time.perf_counter() - started
    logger.info(
        "converted %s: %d tensors, %d layers, %.2f GB %s in %.1f s",
        src,
        len(plan),
        config.num_layers,
        expected_bytes / 1e9,
        str(out_dtype).replace("torch.", ""),
        seconds,
    )
    return ConvertReport(dst, config.num_layers, len(plan), expected_bytes, seconds)


# ---------------------------------------------------------------------------------------------- CLI


def run(args: argparse.Namespace) -> int:
    """Runs ``solar convert``: 0 on success, 2 (one line on stderr) on bad input, 130 on Ctrl-C."""
    try:
        report = convert_gguf(
            args.src, args.dst, force=args.force, max_shard_size=args.max_shard_size, dtype=args.dtype
        )
    except (ValueError, OSError) as error:
        print(f"solar convert: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"solar convert: interrupted; nothing was written to {args.dst}", file=sys.stderr)
        return 130
    print(
        f"wrote {report.path}: {report.num_layers} layers, {report.num_tensors} tensors, "
        f"{report.bytes_written / 1e9:.2f} GB in {report.seconds:.1f} s"
    )
    return 0
