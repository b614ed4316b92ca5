"""Parity with mergekit 0.1.5: every recipe in tests/fixtures/mergekit/recipes/ (tiny.CASES), run here
on the same tiny models (tests/fixtures/mergekit/tiny.py), gives mergekit's tensors bit for bit
(compared by sha256; expected.json was made by mergekit itself with
tests/fixtures/mergekit/regenerate.py), mergekit's config.json fields and, for tokenizer_source over
different vocabularies, mergekit's output vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from solar_kernels.merge import merge_from_yaml
from solar_kernels.upscale import upscale_from_yaml
from tests.fixtures.mergekit import tiny

EXPECTED = json.loads((Path(__file__).parent / "fixtures" / "mergekit" / "expected.json").read_text())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit_sources")
    tiny.make_models(root)
    return root


def test_every_recipe_has_mergekit_outputs_and_every_output_a_recipe():
    assert len(tiny.CASES) >= 30
    assert sorted(tiny.CASES) == sorted(EXPECTED["cases"]), "run regenerate.py for new recipes, delete gone ones"
    kinds = {name: kind for name, (_, kind) in tiny.CASES.items()}
    assert {name for name, kind in kinds.items() if kind == "upscale"} == {
        "passthrough_base_model",
        "passthrough_scale",
        "passthrough_tokenizer_source_union",
        "passthrough_tokenizer_source_union_vocabularies",
    }


@pytest.mark.parametrize("case", sorted(tiny.CASES))
def test_same_tensors_as_mergekit(case, models, tmp_path, monkeypatch):
    recipe, kind = tiny.CASES[case]
    monkeypatch.chdir(models)  # relative model paths are read from the working directory, as mergekit does
    (tmp_path / "recipe.yml").write_text(recipe)
    run = merge_from_yaml if kind == "merge" else upscale_from_yaml
    run(tmp_path / "recipe.yml", tmp_path / "out")
    expected = EXPECTED["cases"][case]
    got = tiny.tensor_digests(tmp_path / "out")
    assert sorted(got) == sorted(expected["tensors"])
    different = [name for name in expected["tensors"] if got[name] != expected["tensors"][name]]
    assert different == [], f"{len(different)} of {len(got)} tensors differ from mergekit's, first {different[:3]}"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == expected["config"]["num_hidden_layers"]
    assert config["vocab_size"] == expected["config"]["vocab_size"]
    if case in tiny.TOKENIZER_CASES:
        # mergekit re-saves the tokenizer with transformers (other JSON layout, the special tokens of
        # tokenizer_config.json listed as added tokens, a rewritten tokenizer_config.json): the
        # vocabulary and the added tokens are compared, parsed.
        assert tiny.tokenizer_summary(tmp_path / "out") == expected["tokenizer"]
    stored = config.get("dtype", config.get("torch_dtype"))
    if case in tiny.CONFIG_FROM_FIRST_MODEL:  # mergekit's pick varies from run to run; ours is the first model
        first = json.loads((models / tiny.CONFIG_FROM_FIRST_MODEL[case] / "config.json").read_text())
        assert stored == first.get("dtype", first.get("torch_dtype"))
    else:
        assert stored == expected["config"].get("dtype", expected["config"].get("torch_dtype"))
