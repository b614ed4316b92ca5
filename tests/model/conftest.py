import pytest
import torch


def hf_tiny_config(kind: str, **overrides):
    """A small, odd-sized transformers config: GQA, several layers, head_dim 12."""
    from transformers import LlamaConfig, MistralConfig

    common = dict(vocab_size=101, hidden_size=48, intermediate_size=100, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    common.update(overrides)
    if kind == "mistral":
        return MistralConfig(sliding_window=common.pop("sliding_window", 5), **common)
    return LlamaConfig(**common)


@pytest.fixture(params=["llama", "mistral"])
def hf_checkpoint(request, tmp_path):
    """(path, transformers model in fp32) for a tiny random checkpoint saved by transformers."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    config = hf_tiny_config(request.param)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # non-trivial norm weights, so a wrong norm cannot hide behind ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    path = tmp_path / request.param
    model.save_pretrained(path, max_shard_size="20KB")
    return path, model
