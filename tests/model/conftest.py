from __future__ import annotations

import pytest
import torch

from tests.helpers import hf_tiny_config


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
