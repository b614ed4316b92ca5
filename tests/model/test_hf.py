from __future__ import annotations

import json
import os

import pytest
import torch

from solar_kernels.checkpoint import CheckpointError, CheckpointReader
from solar_kernels.model import CausalLM, load_pretrained, preset, save_pretrained


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_save_load_save_is_bitwise_identical(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint
    model = load_pretrained(path)
    save_pretrained(model, tmp_path / "one", max_shard_size="30KB")
    save_pretrained(load_pretrained(tmp_path / "one"), tmp_path / "two", max_shard_size="30KB")
    first, second = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert first == second
    assert "model.safetensors.index.json" in first and sum(n.endswith(".safetensors") for n in first) > 1


def test_transformers_loads_what_we_save(hf_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    path, hf = hf_checkpoint
    ours = load_pretrained(path)
    save_pretrained(ours, tmp_path / "saved", max_shard_size="25KB")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32, trust_remote_code=False)
    ids = torch.randint(0, 101, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reloaded(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert written["num_hidden_layers"] == 3 and written.get("dtype", written.get("torch_dtype")) == "float32"
    assert json.loads((tmp_path / "saved" / "generation_config.json").read_text())["eos_token_id"] == 2
    for shard in (tmp_path / "saved").glob("*.safetensors"):
        assert shard.stat().st_size <= 25_000 + 10_000  # a shard holds at most max_shard_size of data + header


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_conversion_on_load_and_save(hf_checkpoint, tmp_path, dtype):
    path, hf = hf_checkpoint
    model = load_pretrained(path, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    save_pretrained(model, tmp_path / "out")
    reader = CheckpointReader(tmp_path / "out")
    assert {reader.dtype(n) for n in reader.names()} == {getattr(torch, dtype)}
    assert (tmp_path / "out" / "model.safetensors").exists()  # one shard: no index


def test_tied_checkpoint_round_trip(tmp_path):
    model = CausalLM.from_config(preset("tiny", tie_word_embeddings=True))
    save_pretrained(model, tmp_path / "tied")
    assert "lm_head.weight" not in CheckpointReader(tmp_path / "tied").names()
    loaded = load_pretrained(tmp_path / "tied")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(loaded.lm_head.weight, model.model.embed_tokens.weight)


def test_a_given_state_dict_is_written_instead_of_the_parameters(tmp_path):
    """save_pretrained(state_dict=...), as the trainer's export passes the full state dict gathered
    from FSDP shards: those tensors (the tied LM head dropped), the model's config, no parameter of
    the model itself."""
    model = CausalLM.from_config(preset("tiny", num_layers=1, tie_word_embeddings=True))
    state = {name: torch.randn_like(tensor) for name, tensor in model.state_dict().items()}
    assert "lm_head.weight" in state
    save_pretrained(model, tmp_path / "given", state_dict=state, dtype="bfloat16")
    reader = CheckpointReader(tmp_path / "given")
    assert sorted(reader.names()) == sorted(name for name in state if name != "lm_head.weight")
    for name in reader.names():
        assert torch.equal(reader.get(name), state[name].to(torch.bfloat16)), name
        assert not torch.equal(reader.get(name), model.state_dict()[name].to(torch.bfloat16)), name
    assert json.loads((tmp_path / "given" / "config.json").read_text())["num_hidden_layers"] == 1


def test_existing_destination_is_refused(tmp_path):
    model = CausalLM.from_config(preset("tiny", num_layers=1))
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        save_pretrained(model, tmp_path / "dst")
    assert (tmp_path / "dst" / "keep.txt").read_text() == "mine"
    save_pretrained(model, tmp_path / "dst", force=True)
    assert not (tmp_path / "dst" / "keep.txt").exists() and (tmp_path / "dst" / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # no temporary directory left


def _sharded(hf_checkpoint):
    path, _ = hf_checkpoint
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return path, index


def test_missing_shard(hf_checkpoint):
    path, index = _sharded(hf_checkpoint)
    victim = sorted(set(index["weight_map"].values()))[1]
    (path / victim).unlink()
    with pytest.raises(CheckpointError, match=f"{victim}: file is missing"):
        load_pretrained(path)


def test_truncated_shard(hf_checkpoint):
    path, index = _sharded(hf_checkpoint)
    victim = path / sorted(set(index["weight_map"].values()))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated: tensor"):
        load_pretrained(path)


def test_corrupt_header(hf_checkpoint):
    path, index = _sharded(hf_checkpoint)
    victim = path / sorted(set(index["weight_map"].values()))[0]
    data = bytearray(victim.read_bytes())
    data[8:12] = b"\xff\xfe{]"
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_pretrained(path)


def test_tensor_missing_from_shard(hf_checkpoint):
    path, index = _sharded(hf_checkpoint)
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = next(iter(index["weight_map"].values()))
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'model.layers.9.mlp.up_proj.weight' listed in .* is missing"):
        load_pretrained(path)


def test_tensor_missing_from_index(hf_checkpoint):
    path, index = _sharded(hf_checkpoint)
    del index["weight_map"]["model.layers.1.self_attn.k_proj.weight"]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing \['model.layers.1.self_attn.k_proj.weight'\]"):
        load_pretrained(path)


def test_checkpoint_of_another_shape(hf_checkpoint):
    path, _ = hf_checkpoint
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 64
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"down_proj.weight. has shape \(48, 100\), the config implies \(48, 64\)"
    ):
        load_pretrained(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_pretrained(tmp_path / "empty")


def test_config_json_checked_on_load(hf_checkpoint):
    path, _ = hf_checkpoint
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "3"}))
    with pytest.raises(
        CheckpointError,
        match=rf"{path / 'config.json'}: key 'num_hidden_layers': expected int, "
        rf"got str \('3'\)$",
    ):
        load_pretrained(path)
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(
        ValueError, match="unsupported architecture Qwen2ForCausalLM; expected LlamaForCausalLM or MistralForCausalLM"
    ):
        load_pretrained(path)


def test_save_drops_remote_code_and_follows_the_umask(hf_checkpoint, tmp_path, caplog):
    path, _ = hf_checkpoint
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling_x.X"}}))
    model = load_pretrained(path)
    old = os.umask(0o022)
    try:
        with caplog.at_level("WARNING", logger="solar_kernels.checkpoint"):
            save_pretrained(model, tmp_path / "out", max_shard_size="20KB")
    finally:
        os.umask(old)
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert "dropped auto_map" in caplog.text and "modeling_x.X" in caplog.text
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert sum(n.endswith(".safetensors") for n in modes) > 1 and modes == dict.fromkeys(modes, 0o644)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
