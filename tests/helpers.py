"""Helpers shared by several test modules: import them from here, never from another test module.

Tiny Hugging Face checkpoints (``HF_TINY``, ``hf_tiny_config``, ``make_checkpoint``, ``tensors``), a
shard writer that fails on demand (``break_shard_writer``), tensors that start one element into their
buffer (``misaligned``), which sends the CUDA kernels down their scalar path, and a tiny random Llama
written as a GGUF file (``write_tiny_gguf``, with a byte-level BPE trained on ``CORPUS``) and converted
to a Hugging Face directory (``tiny_checkpoint``). A command run in the repository that must succeed
(``run_checked``). For the trainer's tests: a config file writer (``write_config``), a small
pretraining config (``pretrain_config``), a pretraining run through the stage runner
(``run_pretrain``) or on two processes (``run_pretrain_on_two_processes``), its logged losses
(``losses``), a CPU trainer (``cpu_trainer``) and one of a model on its pretraining data
(``lm_trainer``). For the kernel tests (tests/ops): each op's float64 form, run and check against
eager torch (``exact_*``, ``run_*``, ``check_*``), ``rope_tables``, ``make_lm_head``,
``options_backend`` and ``IGNORE``. Optional packages (transformers, gguf, tokenizers, yaml), the
training package and the ops are imported by the helpers that need them, when called.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from solar_kernels import checkpoint
from solar_kernels.checkpoint import CheckpointReader

ROOT = Path(__file__).resolve().parents[1]  # the repository


# hf_tiny_config's sizes, as transformers names them (tests/test_patch.py builds its other kinds on them,
# tests/test_merge.py a smaller Llama).
HF_TINY = dict(
    vocab_size=101,
    hidden_size=48,
    intermediate_size=100,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)


def hf_tiny_config(kind: str, **overrides):
    """A small, odd-sized transformers config (``kind`` "llama" or "mistral"): GQA, three layers,
    head_dim 12 (``HF_TINY``, then ``overrides``)."""
    from transformers import LlamaConfig, MistralConfig

    common = {**HF_TINY, **overrides}
    if kind == "mistral":
        return MistralConfig(sliding_window=common.pop("sliding_window", 5), **common)
    return LlamaConfig(**common)


def make_checkpoint(
    path: Path, *, layers: int = 6, seed: int = 0, max_shard_size: str = "30KB", kind: str = "llama", **overrides
) -> Path:
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


def run_checked(command: list[str], *, unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Runs ``command`` in the repository (10 minutes at most) with the environment variables ``unset``
    removed; fails the test with the end of its output unless it exits 0. Returns the finished process."""
    env = {k: v for k, v in os.environ.items() if k not in unset}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def run_pretrain_on_two_processes(config: Path, port_offset: int = 0) -> None:
    """``training.pretrain --config config`` on 2 processes by torch.distributed.run (gloo on the CPU),
    TRITON_INTERPRET unset, through ``run_checked``. The rendezvous port comes from the test process's
    pid (plus ``port_offset``), so that tests running at once do not collide."""
    port = 29500 + (os.getpid() + port_offset) % 1000
    run_checked(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
        + ["-m", "training.pretrain", "--config", str(config)],
        unset=("TRITON_INTERPRET",),
    )


def lm_trainer(config, model, tokenizer, out: Path, name: str, *, batch_size: int = 2):
    """A ``cpu_trainer`` of ``model`` (a CausalLM) on ``config``'s pretraining examples, packed,
    ``batch_size`` rows a batch in a stream seeded 3, writing to ``out`` under ``name``."""
    from training import data as data_lib
    from training import stages
    from training.objectives import LanguageModeling, flops_per_token_fn
    from training.trainer import parallelize

    objective = parallelize(LanguageModeling(model, packed=True), model.model.layers, config, 1, torch.device("cpu"))
    examples = stages.language_modeling_examples("pretrain", config, tokenizer)
    stream = data_lib.BatchStream(
        examples, batch_size, lambda ex: data_lib.collate_lm(ex, tokenizer.pad_token_id), seed=3
    )
    return cpu_trainer(config, objective, stream, flops_per_token_fn(model.config), out, name)


def cpu_trainer(config, objective, stream, flops_per_token, out: Path, name: str = "train", *, world: int = 1):
    """A ``Trainer`` of ``objective`` (its ``count`` counts a batch's items) over ``stream`` on the CPU,
    as rank 0 of ``world`` processes, writing to ``out`` under ``name``."""
    from training.trainer import Trainer

    return Trainer(
        config,
        objective,
        objective.count,
        stream,
        rank=0,
        world=world,
        device=torch.device("cpu"),
        flops_per_token=flops_per_token,
        output_dir=out,
        name=name,
    )


# ----------------------------------------------------------------------------- a tiny GGUF model

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "There are 1234 apples and 56 pears in the basket, 7 of them are red. 1234 1234 1234 1234",
    "A tiny model trained on a tiny corpus says hello, world! Numbers: 2024, 3.14, 100%.",
] * 20
TEXT_WITH_DIGITS = "Order 1234 apples at 09:45, then 56 more; total 1290."
# K-quants: the byte offsets of the float16 scale fields of one block (gguf.quants' block layouts).
K_QUANT_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
TINY = dict(
    vocab_size=300,
    hidden_size=256,
    intermediate_size=512,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def train_tokenizer():
    """A byte-level BPE with SmolLM2's special tokens, trained on CORPUS; returns the tokenizer
    SmolLM2 would use with that vocabulary (digits split one by one before the byte-level regex),
    its tokens by id and its merges. Trained without digit splitting, so that the vocabulary has
    multi-digit tokens and a converter that dropped the digit rule would tokenize numbers differently."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY["vocab_size"],
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda item: item[1])
    assert [i for _, i in vocab] == list(range(TINY["vocab_size"]))
    assert any(sum(c.isdigit() for c in token) >= 2 for token in model["vocab"]), "no multi-digit token learnt"
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
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
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(shape[0], shape[1] // block_size * type_size)


def write_tiny_gguf(
    path: Path,
    qtype_name: str,
    *,
    seed: int = 0,
    architecture: str = "llama",
    tokenizer_model: str = "gpt2",
    pre: str = "smollm",
    tied: bool = False,
    std: float = 0.02,
):
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


# ----------------------------------------------------------------------------- kernel checks (tests/ops)
# Each kernel test judges ours against eager torch and a float64 computation (tests/tolerances.py);
# the ops and their references are imported when a check is called, so importing this module does
# not import Triton.

IGNORE = -100  # the ignore_index of the cross-entropy and log-prob ops
RMS_NORM_EPS = 1e-5


def exact_rms_norm(x, weight, dy, residual=None, dh=None, offset=0.0, eps=RMS_NORM_EPS):
    """docs/method.md#rmsnorm in float64, written out: forward, and the closed-form backward (with Liger's
    ``offset + weight`` scale; weight None: no scale, dweight None). Every casting mode has this
    exact result: the modes differ only in where they round."""
    h = x.double() + (residual.double() if residual is not None else 0)
    w = offset + weight.double() if weight is not None else torch.ones((), dtype=torch.float64, device=x.device)
    dy = dy.double()
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    n = h * rstd
    y = w * n
    g = dy * w
    dx = rstd * (g - n * (g * n).mean(-1, keepdim=True))
    if dh is not None:
        dx = dx + dh.double()
    dw = (dy * n).reshape(-1, n.shape[-1]).sum(0) if weight is not None else None
    return y, h, dx, dw


def run_rms_norm(fn, x, weight, dy, residual=None, dh=None):
    """Forward and gradients of x, weight (and residual) for upstream grads dy (and dh); a None
    weight stays None and gets no gradient."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight)]
    if residual is not None:
        leaves.append(residual.detach().clone().requires_grad_())
        y, h = fn(leaves[0], leaves[1], residual=leaves[2])
        torch.autograd.backward([y, h], [dy, dh])
        return y, h, [leaf.grad if leaf is not None else None for leaf in leaves]
    y = fn(leaves[0], leaves[1])
    y.backward(dy)
    return y, None, [leaf.grad if leaf is not None else None for leaf in leaves]


def check_rms_norm(x, weight, residual=None, backend="triton", offset=0.0, casting_mode="llama"):
    """``sk.rms_norm`` (and its fused residual form) on ``backend``: y, h and every gradient."""
    import solar_kernels as sk
    from solar_kernels.ops.rms_norm import rms_norm_ref
    from tests.tolerances import assert_close

    dtype = x.dtype
    dy = torch.randn(x.shape, dtype=dtype, device=x.device)
    dh = torch.randn(x.shape, dtype=dtype, device=x.device) if residual is not None else None
    options = dict(eps=RMS_NORM_EPS, offset=offset, casting_mode=casting_mode)
    ours_fn = lambda *a, **k: sk.rms_norm(*a, backend=backend, **options, **k)  # noqa: E731
    torch_fn = lambda *a, **k: rms_norm_ref(*a, **options, **k)  # noqa: E731
    y, h, grads = run_rms_norm(ours_fn, x, weight, dy, residual, dh)
    y_ref, h_ref, grads_ref = run_rms_norm(torch_fn, x, weight, dy, residual, dh)
    y64, h64, dx64, dw64 = exact_rms_norm(x, weight, dy, residual, dh, offset)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close("y", y, y_ref, y64, dtype)
    assert_close("dx", grads[0], grads_ref[0], dx64, dtype)
    if weight is not None:
        assert_close("dweight", grads[1], grads_ref[1], dw64, dtype)
        assert grads[1].dtype == weight.dtype
    if residual is not None:
        assert torch.equal(h, h_ref), "h = x + residual must round exactly like eager torch"
        assert_close("h", h, h_ref, h64, dtype)
        assert_close("dresidual", grads[2], grads_ref[2], dx64, dtype)


def rope_tables(positions, head_dim, theta=10000.0, dtype=torch.float32):
    """docs/method.md#rotary-embedding: cos/sin [..., T, D] from integer positions [..., T]."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = positions.double()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def exact_rotary(q, k, cos, sin, dq, dk):
    """The rotate-half formula in float64, with gradients by float64 autograd."""
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    c, s = cos.double().unsqueeze(-3), sin.double().unsqueeze(-3)

    def rot(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), -1)

    q2, k2 = q64 * c + rot(q64) * s, k64 * c + rot(k64) * s
    dq64, dk64 = torch.autograd.grad((q2, k2), (q64, k64), (dq.double(), dk.double()))
    return q2.detach(), k2.detach(), dq64, dk64


def run_rotary(fn, q, k, cos, sin, dq, dk):
    """Rotated q, k and their gradients for upstream grads dq, dk."""
    ql, kl = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    q2, k2 = fn(ql, kl, cos, sin)
    torch.autograd.backward((q2, k2), (dq, dk))
    return q2, k2, ql.grad, kl.grad


def check_rotary(q, k, cos, sin, backend="triton"):
    """``sk.apply_rotary`` on ``backend``: q', k', dq and dk."""
    import solar_kernels as sk
    from solar_kernels.ops.rotary import apply_rotary_ref
    from tests.tolerances import assert_close

    dtype = q.dtype
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    ours = run_rotary(lambda *a: sk.apply_rotary(*a, backend=backend), q, k, cos, sin, dq, dk)
    eager = run_rotary(apply_rotary_ref, q, k, cos, sin, dq, dk)
    exact = exact_rotary(q, k, cos, sin, dq, dk)
    for name, a, b, c in zip(("q'", "k'", "dq", "dk"), ours, eager, exact):
        assert a.dtype == dtype
        assert_close(name, a, b, c, dtype)


def exact_swiglu(gate, up, dy):
    """docs/method.md#swiglu in float64: forward and the closed-form backward."""
    g, u, dy = gate.double(), up.double(), dy.double()
    sig = torch.sigmoid(g)
    y = g * sig * u
    du = dy * g * sig
    dg = dy * u * sig * (1 + g * (1 - sig))
    return y, dg, du


def run_swiglu(fn, gate, up, dy):
    """y and the gradients of gate and up for upstream grad dy."""
    g = gate.detach().clone().requires_grad_()
    u = up.detach().clone().requires_grad_()
    y = fn(g, u)
    y.backward(dy)
    return y, g.grad, u.grad


def check_swiglu(gate, up, backend="triton"):
    """``sk.swiglu`` on ``backend``: y, dgate and dup."""
    import solar_kernels as sk
    from solar_kernels.ops.swiglu import swiglu_ref
    from tests.tolerances import assert_close

    dtype = gate.dtype
    dy = torch.randn(gate.shape, dtype=dtype, device=gate.device)
    y, dg, du = run_swiglu(lambda g, u: sk.swiglu(g, u, backend=backend), gate, up, dy)
    y_ref, dg_ref, du_ref = run_swiglu(swiglu_ref, gate, up, dy)
    y64, dg64, du64 = exact_swiglu(gate, up, dy)
    assert y.dtype == dtype and y.shape == gate.shape
    assert_close("y", y, y_ref, y64, dtype)
    assert_close("dgate", dg, dg_ref, dg64, dtype)
    assert_close("dup", du, du_ref, du64, dtype)


def make_lm_head(tokens_shape, d, vocab, dtype, device, bias=False, ignore_share=0.3):
    """Random LM-head inputs: hidden [*tokens_shape, d], weight [vocab, d], bias [vocab] or None,
    labels [*tokens_shape] with about ``ignore_share`` of them IGNORE."""
    hidden = torch.randn(*tokens_shape, d, dtype=dtype, device=device)
    weight = torch.randn(vocab, d, dtype=dtype, device=device) / d**0.5 * 2
    labels = torch.randint(0, vocab, tokens_shape, device=device)
    labels[torch.rand(tokens_shape, device=device) < ignore_share] = IGNORE
    b = torch.randn(vocab, dtype=dtype, device=device) if bias else None
    return hidden, weight, b, labels


def exact_logprobs(hidden, weight, labels, bias):
    """docs/method.md#log-probs-through-the-lm-head in float64 from scratch: full logits, log-softmax, gather, 0 where ignored."""
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    logp = logits - logits.logsumexp(-1, keepdim=True)
    valid = labels != IGNORE
    picked = logp.gather(-1, labels.clamp_min(0).long().unsqueeze(-1)).squeeze(-1)
    return picked * valid


def run_lm_head(fn, hidden, weight, bias, labels, upstream):
    """Output of fn and the gradients of (hidden, weight[, bias]) for the given upstream grad."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    out = fn(leaves[0], leaves[1], labels, leaves[2] if bias is not None else None)
    grads = torch.autograd.grad(out, leaves, upstream)
    return out.detach(), grads


def check_lm_head(fn_ours, fn_eager, fn_exact, hidden, weight, bias, labels, upstream):
    """An LM-head op ``fn(hidden, weight, labels, bias)`` against its eager reference and its float64
    form: a float32 output, and gradients of the inputs' dtypes and shapes."""
    from tests.tolerances import assert_close

    dtype = hidden.dtype
    out, grads = run_lm_head(fn_ours, hidden, weight, bias, labels, upstream)
    out_eager, grads_eager = run_lm_head(fn_eager, hidden, weight, bias, labels, upstream)
    out_exact, grads_exact = run_lm_head(
        fn_exact,
        hidden.double(),
        weight.double(),
        bias.double() if bias is not None else None,
        labels,
        upstream.double(),
    )
    assert out.dtype == torch.float32
    assert_close("output", out, out_eager, out_exact, dtype)
    for name, a, b, c, like in zip(
        ("dhidden", "dweight", "dbias"), grads, grads_eager, grads_exact, (hidden, weight, bias)
    ):
        assert a.dtype == like.dtype and a.shape == like.shape
        assert_close(name, a, b, c, dtype)


def check_logprobs(hidden, weight, bias, labels, backend="triton", **kwargs):
    """``sk.linear_logprobs`` on ``backend`` (``kwargs`` passed on) through ``check_lm_head``."""
    import solar_kernels as sk
    from solar_kernels.ops.linear_logprobs import linear_logprobs_ref

    upstream = torch.randn(labels.shape, device=hidden.device)
    check_lm_head(
        lambda h, w, y, b: sk.linear_logprobs(h, w, y, bias=b, backend=backend, **kwargs),
        lambda h, w, y, b: linear_logprobs_ref(h, w, y, b),
        exact_logprobs,
        hidden,
        weight,
        bias,
        labels,
        upstream,
    )


def options_backend(backend: str) -> str:
    """The backend for a call with cross-entropy options: on a GPU the "cuda" run takes them through
    "auto" (the CUDA kernel has none, refused as tests/ops/test_cross_entropy.py checks)."""
    return "auto" if backend == "cuda" else backend


def exact_cross_entropy(
    logits64, labels, reduction="mean", label_smoothing=0.0, lse_square_scale=0.0, softcap=None, weight=None, **_flags
):
    """float64, from PyTorch's own cross-entropy of the soft-capped logits plus the z-loss."""
    if softcap is not None:
        logits64 = softcap * torch.tanh(logits64 / softcap)
    loss = torch.nn.functional.cross_entropy(
        logits64,
        labels.long(),
        weight=weight.double() if weight is not None else None,
        ignore_index=IGNORE,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    valid = labels != IGNORE
    z_loss = torch.where(valid, lse_square_scale * logits64.logsumexp(-1).square(), 0.0)
    if reduction == "none":
        return loss + z_loss
    return loss + (z_loss.sum() / valid.sum() if reduction == "mean" else z_loss.sum())


def assert_compiles_like_eager(f, *leaves: torch.Tensor) -> None:
    """``f(*leaves)`` (a scalar) compiled by ``torch.compile(fullgraph=True)`` gives eager's value and
    eager's gradients of ``leaves``: the op traces without a graph break."""
    eager = f(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(*leaves)
    torch.testing.assert_close(out, eager)
    for grad, eager_grad in zip(torch.autograd.grad(out, leaves), eager_grads):
        torch.testing.assert_close(grad, eager_grad)
