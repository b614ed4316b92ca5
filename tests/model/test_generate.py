from __future__ import annotations

import pytest
import torch

from solar_kernels.model import CausalLM, generate, load_pretrained, preset
from solar_kernels.model.generate import sample_next


@pytest.fixture
def model(device):
    torch.manual_seed(3)
    return CausalLM.from_config(preset("tiny"), device=device).eval()


def test_batched_prompts_of_different_lengths_decode_as_alone(model):
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    batched = generate(model, prompts, 6, eos_token_id=-1)
    alone = [generate(model, [p], 6, eos_token_id=-1)[0] for p in prompts]
    assert batched == alone
    assert all(len(out) == 6 for out in batched)


def test_greedy_matches_uncached_argmax(model, device):
    prompt = [3, 1, 4, 1, 5]
    out = generate(model, [prompt], 5, eos_token_id=-1)[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids], device=device))[0, -1].argmax()))
    assert out == ids[len(prompt) :]


def test_stops_at_eos(model):
    first = generate(model, [[7, 8, 9]], 1, eos_token_id=-1)[0][0]
    out = generate(model, [[7, 8, 9], [1, 2]], 5, eos_token_id=first)
    assert out[0] == [first]  # stops right away, EOS kept
    assert len(out[1]) <= 5


def test_matches_transformers_greedy_generate(hf_checkpoint):
    path, hf = hf_checkpoint
    ours = load_pretrained(path).eval()
    prompt = torch.tensor([[1, 17, 33, 51, 8]])
    expected = hf.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generate(ours, [prompt[0].tolist()], 6, eos_token_id=-1)[0] == expected[0, 5:].tolist()


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0], [5.0, 0.0, 0.0, 4.9]])
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits), torch.tensor([1, 0]))
    for _ in range(20):
        assert torch.equal(sample_next(logits, temperature=1.0, top_k=1, generator=g), torch.tensor([1, 0]))
        assert torch.equal(sample_next(logits, temperature=1.0, top_p=0.01, generator=g), torch.tensor([1, 0]))
        top2 = sample_next(logits, temperature=5.0, top_k=2, generator=g)
        assert top2[0] in (1, 2) and top2[1] in (0, 3)
    draws = torch.stack([sample_next(logits, temperature=1.0, generator=g) for _ in range(400)])
    assert set(draws[:, 0].tolist()) == {0, 1, 2, 3}  # no filter: every token can come out


def test_seeded_sampling_is_reproducible(model):
    runs = [
        generate(
            model,
            [[1, 2, 3]],
            8,
            temperature=0.9,
            top_p=0.9,
            eos_token_id=-1,
            generator=torch.Generator(device=next(model.parameters()).device).manual_seed(11),
        )
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[], max_new_tokens=3), "non-empty list"),
        (dict(prompts=[[1], []], max_new_tokens=3), "non-empty list"),
        (dict(prompts=[[1]], max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
        (dict(prompts=[[1]], max_new_tokens=2, top_p=0.0), "0 < top_p <= 1"),
    ],
)
def test_bad_arguments(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, **kwargs)
