"""Helpers shared by several test modules: import them from here, never from another test module.

Tiny Hugging Face checkpoints (``hf_tiny_config``, ``make_checkpoint``, ``tensors``), a shard writer
that fails on demand (``break_shard_writer``), tensors that start one element into their buffer
(``misaligned``), which sends the CUDA kernels down their scalar path, and a tiny random Llama written
as a GGUF file (``write_tiny_gguf``, with a byte-level BPE trained on ``CORPUS``) and converted to a
Hugging Face directory (``tiny_checkpoint``). For the trainer's tests: a config file writer
(``write_config``), a small pretraining config (``pretrain_config``), a pretraining run through the
stage runner (``run_pretrain``) and its logged losses (``losses``). Optional packages (transformers,
gguf, tokenizers, yaml) are imported by the helpers that need them, when called.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from solar_kernels import checkpoint
from solar_kernels.checkpoint import CheckpointReader

ROOT = Path(__file__).resolve().parents[1]  # the repository


def hf_tiny_config(kind: str, **overrides):
    """A small, odd-sized transformers config (``kind`` "llama" or "mistral"): GQA, three layers,
    head_dim 12."""
    from transformers import LlamaConfig, MistralConfig

    common = dict(vocab_size=101, hidden_size=48, intermediate_size=100, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    common.update(overrides)
    if kind == "mistral":
        return MistralConfig(sliding_window=common.pop("sliding_window", 5), **common)
    return LlamaConfig(**common)


def make_checkpoint(path: Path, *, layers: int = 6, seed: int = 0, max_shard_size: str = "30KB",
                    kind: str = "llama", **overrides) -> Path:
    """A random tiny checkpoint saved by transformers into ``path`` (several shards by default)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_tiny_config(kind, num_hidden_layers=layers, **overrides))
    model.save_pretrained(path, max_shard_size=max_shard_size)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    return path


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint directory ``path``, by name."""
    reader = CheckpointReader(path)
    return {name: reader.get(name) for name in reader.names()}


def break_shard_writer(monkeypatch, at: int, error: BaseException) -> list[str]:
    """Makes ``ShardWriter.add`` raise ``error`` on its ``at``-th call (a disk failure, a Ctrl-C
    in the middle of writing); returns the list of tensor names it was called with."""
    calls = []
    original = checkpoint.ShardWriter.add

    def add(self, name, tensor):
        calls.append(name)
        if len(calls) == at:
            raise error
        original(self, name, tensor)

    monkeypatch.setattr(checkpoint.ShardWriter, "add", add)
    return calls


def misaligned(*shape: int, dtype: torch.dtype, scale: float = 1.0, device: str = "cpu") -> torch.Tensor:
    """Random values (standard normal times ``scale``) in a tensor that starts one element into its
    buffer: not 16-byte aligned, so the CUDA kernels take their scalar path."""
    buffer = torch.randn(math.prod(shape) + 1, device=device).mul_(scale).to(dtype)
    tensor = buffer[1:].view(shape)
    if tensor.data_ptr() % 16 == 0:
        raise AssertionError(f"misaligned: {dtype} view at {tensor.data_ptr():#x} is 16-byte aligned")
    return tensor


# ----------------------------------------------------------------------------- trainer runs

def write_config(path: Path, **sections) -> Path:
    """Writes ``sections`` (``model={...}, train={...}``) to ``path`` as a YAML config file."""
    import yaml

    path.write_text(yaml.safe_dump(sections))
    return path


def pretrain_config(workspace: Path, out: Path, **train) -> dict[str, dict]:
    """A tiny float32 pretraining config on the ``workspace`` fixture's tokenizer and corpus, writing
    to ``out``; ``train`` overrides keys of its ``train`` section."""
    return {
        "model": {"preset": "tiny", "tokenizer": str(workspace / "tokenizer"), "dtype": "float32", "backend": "torch"},
        "data": {"train": str(workspace / "corpus.jsonl"), "seq_len": 48},
        "optim": {"lr": 3.0e-3, "warmup_steps": 2},
        "train": {"steps": 8, "batch_size": 4, "output_dir": str(out), "seed": 3, **train},
    }


def losses(out: Path) -> list[float]:
    """The loss of every step the run in ``out`` logged to its metrics.jsonl."""
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def run_pretrain(workspace: Path, out: Path, **train):
    """Runs ``pretrain_config(workspace, out, **train)`` through the stage runner (config written
    next to ``out``); returns the stage's history."""
    from training.config import load_config
    from training.stages import run_stage

    path = write_config(Path(str(out) + ".yaml"), **pretrain_config(workspace, out, **train))
    return run_stage("pretrain", load_config(path))["pretrain"]


# ----------------------------------------------------------------------------- a tiny GGUF model

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
CORPUS = ["The capital of France is Paris. The capital of Italy is Rome.",
          "There are 1234 apples and 56 pears in the basket, 7 of them are red. 1234 1234 1234 1234",
          "A tiny model trained on a tiny corpus says hello, world! Numbers: 2024, 3.14, 100%."] * 20
TEXT_WITH_DIGITS = "Order 1234 apples at 09:45, then 56 more; total 1290."
# K-quants: the byte offsets of the float16 scale fields of one block (gguf.quants' block layouts).
K_QUANT_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
TINY = dict(vocab_size=300, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2,
            max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
            pad_token_id=2)


def train_tokenizer():
    """A byte-level BPE with SmolLM2's special tokens, trained on CORPUS; returns the tokenizer
    SmolLM2 would use with that vocabulary (digits split one by one before the byte-level regex),
    its tokens by id and its merges. Trained without digit splitting, so that the vocabulary has
    multi-digit tokens and a converter that dropped the digit rule would tokenize numbers differently."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY["vocab_size"], special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda item: item[1])
    assert [i for _, i in vocab] == list(range(TINY["vocab_size"]))
    assert any(sum(c.isdigit() for c in token) >= 2 for token in model["vocab"]), "no multi-digit token learnt"
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return tokenizer, [token for token, _ in vocab], merges


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows: [head, 2, hd/2] -> [head, hd/2, 2]."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_to_gguf_name(name: str) -> str:
    """The GGUF tensor name of Hugging Face tensor ``name`` (the converter's tables, inverted)."""
    from solar_kernels import convert

    inverse = {hf: g for g, hf in convert._GLOBAL_NAMES.items()}
    if name in inverse:
        return inverse[name]
    _, _, layer, rest = name.split(".", 3)
    return f"blk.{layer}." + {hf: g for g, hf in convert._LAYER_NAMES.items()}[rest]


def random_k_blocks(qtype, shape: tuple[int, int], generator: np.random.Generator) -> np.ndarray:
    """Random bytes of a K-quant tensor [rows, row bytes] with small finite float16 scales."""
    import gguf

    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = generator.integers(0, 256, size=(shape[0] * shape[1] // block_size, type_size), dtype=np.uint8)
    for offset in K_QUANT_SCALES[qtype.name]:
        scales = generator.uniform(1e-4, 2e-3, size=blocks.shape[0]).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(shape[0], shape[1] // block_size * type_size)


def write_tiny_gguf(path: Path, qtype_name: str, *, seed: int = 0, architecture: str = "llama",
                    tokenizer_model: str = "gpt2", pre: str = "smollm", tied: bool = False, std: float = 0.02):
    """Writes a 2-layer random Llama as a GGUF file with every matrix in ``qtype_name`` (norms F32).

    Returns (tensors GGUF dequantizes to, in HF names and order, before undoing the permutation;
    the original F32 weights; the trained tokenizer)."""
    import gguf

    from solar_kernels.model import CausalLM, ModelConfig

    Q = gguf.GGMLQuantizationType
    hf_tokenizer, tokens, merges = train_tokenizer()
    config = ModelConfig(**TINY, tie_word_embeddings=tied, initializer_range=std)
    torch.manual_seed(seed)
    model = CausalLM.from_config(config)
    originals = {name: p.detach().numpy().copy() for name, p in model.named_parameters()}
    rng = np.random.default_rng(seed)
    qtype = Q[qtype_name]
    writer = gguf.GGUFWriter(str(path), architecture)
    prefix = architecture
    writer.add_uint32(f"{prefix}.block_count", config.num_layers)
    writer.add_uint32(f"{prefix}.context_length", config.max_position_embeddings)
    writer.add_uint32(f"{prefix}.embedding_length", config.hidden_size)
    writer.add_uint32(f"{prefix}.feed_forward_length", config.intermediate_size)
    writer.add_uint32(f"{prefix}.attention.head_count", config.num_heads)
    writer.add_uint32(f"{prefix}.attention.head_count_kv", config.num_kv_heads)
    writer.add_float32(f"{prefix}.rope.freq_base", config.rope_theta)
    writer.add_float32(f"{prefix}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    writer.add_uint32(f"{prefix}.rope.dimension_count", config.head_dim)
    writer.add_uint32(f"{prefix}.vocab_size", config.vocab_size)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    stored = {}
    for name, weight in originals.items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith("q_proj.weight"):
            weight = llama_cpp_permute(weight, config.num_heads)
        elif name.endswith("k_proj.weight"):
            weight = llama_cpp_permute(weight, config.num_kv_heads)
        if weight.ndim == 1 or qtype_name == "F32":
            data, raw = weight.astype(np.float32), None
        elif qtype_name in K_QUANT_SCALES:
            data, raw = random_k_blocks(qtype, weight.shape, rng), qtype
        elif qtype_name == "F16":
            data, raw = weight.astype(np.float16), None
        else:
            data, raw = gguf.quants.quantize(weight, qtype), qtype
        writer.add_tensor(hf_to_gguf_name(name), data, raw_dtype=raw)
        stored[name] = gguf.quants.dequantize(data, raw or (Q.F16 if data.dtype == np.float16 else Q.F32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored, originals, hf_tokenizer


def tiny_checkpoint(root: Path) -> Path:
    """A tiny random Llama converted from GGUF (byte-level BPE tokenizer with a chat template, eos 2)."""
    from solar_kernels import convert

    write_tiny_gguf(root / "tiny.gguf", "F32", seed=5, std=0.1)
    convert.convert_gguf(root / "tiny.gguf", root / "hf")
    return root / "hf"
