"""Tests for solar_kernels/merge/: parameter settings (gradients, filters, levels), the method
registry, the random-mask methods (seeded, density, rescale), architecture checks (--allow-crimes),
the model card, compute_dtype, and the `solar merge` options for them."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from solar_kernels.cli import main
from solar_kernels.merge import METHODS, merge, merge_from_yaml
from solar_kernels.merge.settings import check_parameters, check_setting, evaluate, resolve
from solar_kernels.merge.task_arithmetic import bernoulli_sparsify, della_sparsify
from tests.fixtures.mergekit import tiny
from tests.helpers import make_checkpoint, tensors

# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t, expected", [(0.0, 0.0), (0.25, 0.5), (0.5, 0.3), (0.625, 0.5), (1.0, 1.0)])
def test_gradient_interpolates_between_neighbours(t, expected):
    # [0, 0.5, 0.3, 0.7, 1] spans t in [0, 1] in 4 steps: t = 0.625 is halfway from 0.3 to 0.7.
    assert evaluate(check_setting("t", [0, 0.5, 0.3, 0.7, 1]), "x", t) == pytest.approx(expected, abs=1e-15)


def test_filters_first_match_wins_and_fall_through():
    setting = check_setting("t", [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.25}])
    assert evaluate(setting, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.5
    assert evaluate(setting, "model.layers.0.mlp.up_proj.weight", 0.5) == 0.25
    assert evaluate(setting, "model.norm.weight", 0.5) is None  # no filter matches: the next level is asked
    levels = (setting, {"t": 0.9})
    assert resolve("t", ({"t": setting}, {"t": 0.9}), "model.norm.weight", 0.5, None) == 0.9
    assert resolve("t", ({"t": setting}, {"t": 0.9}), "model.layers.1.mlp.x", 0.5, None) == 0.25
    assert resolve("density", levels[1:], "x", 0, 0.7) == 0.7  # the default when no level has it
    # "*" and a missing filter match every tensor; one mapping is a one-item list (as mergekit)
    assert evaluate(check_setting("t", [{"filter": "*", "value": 0.1}]), "anything", 0) == 0.1
    assert evaluate(check_setting("t", {"filter": "mlp", "value": 0.2}), "a.mlp.b", 0) == 0.2


@pytest.mark.parametrize(
    "value, message",
    [
        ([], r"expected a number, a gradient"),
        ("0.5", r"expected a number"),
        ([0, "x"], r"expected a number"),
        ([{"value": 1}, 0.5], r"expected a number"),
        ([{"filter": "mlp"}], r"a filter entry needs a value"),
        ([{"filter": 3, "value": 1}], r"filter must be a piece of a tensor name"),
        (math.inf, r"expected a number"),
        ([{"filter": "mlp", "value": [{"value": 1}]}], r"value must be a number or a gradient"),
    ],
)
def test_bad_settings(value, message):
    with pytest.raises(ValueError, match=message):
        check_setting("parameters: t", value)


def test_a_level_of_parameters_is_checked_name_by_name():
    """One check for merges and depth up-scaling: None is no parameters, any mapping is taken, and
    an unknown name lists what the method takes (``some of`` only when it takes several)."""
    from types import MappingProxyType

    assert check_parameters("parameters", None, ("t",), "slerp") == {}
    assert check_parameters("parameters", MappingProxyType({"t": [0, 1]}), ("t",), "slerp") == {"t": [0, 1]}
    with pytest.raises(
        ValueError,
        match=r"^parameters: expected a mapping of parameter names to values, "
        r"got \[0\.5\]$",
    ):
        check_parameters("parameters", [0.5], ("t",), "slerp")
    with pytest.raises(ValueError, match=r"^parameters: t: expected a number"):
        check_parameters("parameters", {"t": "half"}, ("t",), "slerp")
    for allowed, expected in [
        ((), r"expected \(none\)"),
        (("t",), "expected t"),
        (("weight", "density"), "expected some of weight, density"),
    ]:
        with pytest.raises(
            ValueError,
            match=rf"^models\[1\] parameters: parameter 'gamma' does not apply to "
            rf"ties; {expected}$",
        ):
            check_parameters("models[1] parameters", {"gamma": 0.1}, allowed, "ties")


def test_every_method_declares_its_parameters():
    assert set(METHODS) == {
        "linear",
        "slerp",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "dare_linear",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "model_stock",
        "nuslerp",
    }
    # mergekit's defaults: normalize on for linear/ties/della, rescale on for dare/della
    defaults = {name: {p.name: p.default for p in m.parameters} for name, m in METHODS.items()}
    assert defaults["ties"]["normalize"] and not defaults["ties"]["rescale"]
    assert defaults["dare_ties"]["rescale"] and not defaults["dare_ties"]["normalize"]
    assert defaults["della"]["normalize"] and defaults["della"]["rescale"]
    assert not defaults["task_arithmetic"]["normalize"] and defaults["linear"]["normalize"]
    assert [p.name for p in METHODS["breadcrumbs"].tensor_parameters] == ["weight", "density", "gamma"]
    assert [p.name for p in METHODS["della"].tensor_parameters] == ["weight", "density", "epsilon"]
    assert {m.name for m in METHODS.values() if m.random} == {"dare_ties", "dare_linear", "della", "della_linear"}


# ----------------------------------------------------------------------------------------------
# Random masks
# ----------------------------------------------------------------------------------------------


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def test_dare_mask_is_seeded_keeps_density_and_rescales_l1():
    delta = torch.randn(200, 300, generator=torch.Generator().manual_seed(0))
    first = bernoulli_sparsify(delta, 0.3, True, _generator(0))
    again = bernoulli_sparsify(delta, 0.3, True, _generator(0))
    other = bernoulli_sparsify(delta, 0.3, True, _generator(1))
    assert torch.equal(first, again) and not torch.equal(first, other)
    kept = (first != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.01  # 60000 draws: the standard deviation of the kept share is 0.002
    torch.testing.assert_close(first.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)
    unscaled = bernoulli_sparsify(delta, 0.3, False, _generator(0))
    assert torch.equal(unscaled != 0, first != 0) and torch.equal(unscaled[unscaled != 0], delta[unscaled != 0])


def test_della_keeps_large_entries_more_often():
    delta = torch.randn(64, 2000, generator=torch.Generator().manual_seed(1))
    kept = della_sparsify(delta, 0.5, 0.3, False, _generator(0)) != 0
    order = delta.abs().argsort(dim=1)
    smallest = kept.gather(1, order[:, :200]).float().mean().item()
    largest = kept.gather(1, order[:, -200:]).float().mean().item()
    assert smallest < 0.25 < 0.75 < largest  # probabilities ramp from 0.2 to 0.8 along the ranks
    with pytest.raises(ValueError, match=r"epsilon must keep density \+/- epsilon inside \(0, 1\)"):
        della_sparsify(delta, 0.5, 0.5, False, _generator(0))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tiny.make_models(root)
    return root


def test_dare_merge_is_reproducible_and_seed_dependent(models, tmp_path):
    kwargs = dict(method="dare_ties", base_model=models / "base", weights=[0.5, 0.5], density=0.5)
    one = tensors(merge([models / "a", models / "b"], tmp_path / "one", seed=7, **kwargs))
    two = tensors(merge([models / "a", models / "b"], tmp_path / "two", seed=7, **kwargs))
    three = tensors(merge([models / "a", models / "b"], tmp_path / "three", seed=8, **kwargs))
    assert all(torch.equal(one[n], two[n]) for n in one)
    assert any(not torch.equal(one[n], three[n]) for n in one)


def test_compute_dtype_float32_reads_unrounded_sources(models, tmp_path):
    """compute_dtype float32 with dtype bfloat16: one rounding (of the fp32 result), not three."""
    out = merge(
        [models / "a", models / "b"],
        tmp_path / "out",
        method="linear",
        weights=[0.3, 0.7],
        dtype="bfloat16",
        compute_dtype="float32",
    )
    a, b = tensors(models / "a"), tensors(models / "b")
    for name, tensor in tensors(out).items():
        assert tensor.dtype == torch.bfloat16
        expected = ((a[name] * 0.3 + b[name] * 0.7) / 1.0).to(torch.bfloat16)
        torch.testing.assert_close(tensor, expected, rtol=2**-8, atol=0, msg=name)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


# ----------------------------------------------------------------------------------------------
# Architectures, model card, CLI
# ----------------------------------------------------------------------------------------------


def test_llama_with_mistral_needs_allow_crimes(tmp_path, caplog):
    llama = make_checkpoint(tmp_path / "llama", kind="llama", layers=2, seed=1)
    mistral = make_checkpoint(tmp_path / "mistral", kind="mistral", layers=2, seed=2)
    with pytest.raises(
        ValueError,
        match=r"models of different architectures: model_type 'llama' in .*llama vs "
        r"'mistral' in .*mistral; pass allow_crimes=True / --allow-crimes",
    ):
        merge([llama, mistral], tmp_path / "out", method="linear")
    assert not (tmp_path / "out").exists()
    code = main(["merge", str(tmp_path / "out"), "--models", str(llama), str(mistral), "--no-progress"])
    assert code == 2 and not (tmp_path / "out").exists()
    with caplog.at_level("WARNING"):
        assert (
            main(
                [
                    "merge",
                    str(tmp_path / "out"),
                    "--models",
                    str(llama),
                    str(mistral),
                    "--allow-crimes",
                    "--no-progress",
                ]
            )
            == 0
        )
    assert "allowed: allow_crimes" in caplog.text


def test_model_card_holds_the_recipe_and_the_inputs(models, tmp_path, monkeypatch):
    monkeypatch.chdir(models)
    recipe, _ = tiny.CASES["ties_fp32"]
    (tmp_path / "ties.yml").write_text(recipe)
    out = merge_from_yaml(tmp_path / "ties.yml", tmp_path / "merged")
    card = (out / "README.md").read_text()
    assert f"```yaml\n{recipe.rstrip()}\n```" in card
    assert "ties, with base as the base model" in card and "- a\n- b\n- c\n" in card
    assert (out / "mergekit_config.yml").read_text() == recipe
    # a merge given as arguments gets a generated mergekit recipe, which merge_from_yaml runs again
    again = merge([models / "a", models / "b"], tmp_path / "api", method="slerp", t=0.25)
    generated = (again / "mergekit_config.yml").read_text()
    assert "merge_method: slerp" in generated and "t: 0.25" in generated
    rerun = merge_from_yaml(again / "mergekit_config.yml", tmp_path / "rerun")
    assert all(torch.equal(x, tensors(rerun)[n]) for n, x in tensors(again).items())


def test_merge_command_dtype_options(models, tmp_path):
    a, b, base = (str(models / n) for n in ("a", "b", "base"))
    assert (
        main(
            [
                "merge",
                str(tmp_path / "m"),
                "--models",
                a,
                "--base-model",
                base,
                "--method",
                "task_arithmetic",
                "--weights",
                "0.5",
                "--dtype",
                "bfloat16",
                "--out-dtype",
                "float16",
                "--no-progress",
            ]
        )
        == 0
    )
    assert {t.dtype for t in tensors(tmp_path / "m").values()} == {torch.float16}
    assert (
        main(
            [
                "merge",
                str(tmp_path / "d"),
                "--models",
                a,
                b,
                "--base-model",
                base,
                "--method",
                "dare_linear",
                "--density",
                "0.5",
                "--random-seed",
                "3",
                "--compute-dtype",
                "float32",
                "--no-progress",
            ]
        )
        == 0
    )
    direct = merge(
        [models / "a", models / "b"],
        tmp_path / "direct",
        method="dare_linear",
        base_model=models / "base",
        density=0.5,
        seed=3,
    )
    assert all(torch.equal(x, tensors(direct)[n]) for n, x in tensors(tmp_path / "d").items())


def test_tokenizer_files_mergekit_copies_are_copied(models, tmp_path):
    """mergekit --copy-tokenizer also copies merges.txt and chat_template.json from the base model."""
    base = tmp_path / "base"
    shutil.copytree(models / "base", base)
    (base / "merges.txt").write_text("#version: 0.2\na b\n")
    (base / "chat_template.json").write_text('{"chat_template": "{{ messages }}"}')
    out = merge([models / "a", models / "b"], tmp_path / "out", method="ties", base_model=base, density=0.5)
    assert (out / "merges.txt").read_text() == "#version: 0.2\na b\n"
    assert json.loads((out / "chat_template.json").read_text()) == {"chat_template": "{{ messages }}"}


def test_tokenizer_source_bad_input_is_refused_before_work(models, tmp_path):
    """(Parity over different vocabularies: tests/test_merge_mergekit.py.) A missing base, an unknown
    source, a model without tokenizer.json, ids past vocab_size, rows that are not vocab_size and a
    bad pad_to_multiple_of are refused before anything is written."""
    kwargs = dict(method="ties", base_model=models / "base", density=0.5)
    with pytest.raises(ValueError, match=r"tokenizer_source: base needs base_model"):
        merge([models / "a", models / "b"], tmp_path / "out", method="linear", tokenizer_source="base")
    with pytest.raises(ValueError, match=r"must be base, union or a local model directory, got 'mine'"):
        merge([models / "a", models / "b"], tmp_path / "out", method="linear", tokenizer_source="mine")
    odd = tmp_path / "odd"
    shutil.copytree(models / "b", odd)
    tiny.write_tokenizer(odd, tokens=[*tiny.base_tokens(), "w64"])  # 65 tokens, 64 rows
    with pytest.raises(
        ValueError,
        match=r"odd/tokenizer.json has 1 token ids at or past the model's vocab_size 64 "
        r"\(first 64\); expected every id below vocab_size",
    ):
        merge([models / "a", odd], tmp_path / "out", tokenizer_source="union", **kwargs)
    (odd / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"tokenizer_source: every model needs a tokenizer.json .*/odd has none"):
        merge([models / "a", odd], tmp_path / "out", tokenizer_source="union", **kwargs)
    shutil.copyfile(models / "b" / "tokenizer.json", odd / "tokenizer.json")
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps(dict(config, vocab_size=60)))
    with pytest.raises(ValueError, match=r"odd has 64 embedding rows but config.json vocab_size 60; expected as many"):
        merge([models / "a", odd], tmp_path / "out", tokenizer_source="union", **kwargs)
    for pad in (0, 2.5, True):
        with pytest.raises(ValueError, match=rf"pad_to_multiple_of must be a positive integer, got {pad!r}"):
            merge(
                [models / "a", models / "b"],
                tmp_path / "out",
                tokenizer_source="union",
                pad_to_multiple_of=pad,
                **kwargs,
            )
    with pytest.raises(
        ValueError,
        match=r"pad_to_multiple_of applies with tokenizer_source only, "
        r"got pad_to_multiple_of 32 and no tokenizer_source",
    ):
        merge([models / "a", models / "b"], tmp_path / "out", pad_to_multiple_of=32, **kwargs)
    assert not (tmp_path / "out").exists()
    # a model path as the source: its tokenizer files (here its own tokenizer_config) are the output's
    donor = tmp_path / "donor"
    shutil.copytree(models / "c", donor)
    (donor / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast", "which": "donor"}')
    out = merge([models / "a", models / "b"], tmp_path / "donor_out", tokenizer_source=donor, **kwargs)
    assert json.loads((out / "tokenizer_config.json").read_text())["which"] == "donor"
    assert f"tokenizer_source: {donor}" in (out / "mergekit_config.yml").read_text()


def _vocabulary_model(directory, tokens, added=()):
    directory.mkdir()
    tiny.write_tokenizer(
        directory,
        tokens=list(tokens),
        added=[
            {
                "id": len(tokens) + i,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, content in enumerate(added)
        ],
    )
    return directory


def test_tokenizer_union_rows_follow_mergekits_rules(tmp_path):
    """The union's ids (base's, then new plain tokens, then new added ones) and each rule for a row a
    model lacks: the one model that has it, the base's, the mean, zeros; padding rows are the mean."""
    from solar_kernels.merge.tokenizer import plan_tokenizer

    base = _vocabulary_model(tmp_path / "base", ["x", "y", "z"])
    one = _vocabulary_model(tmp_path / "one", ["y", "x", "q", "s"])
    two = _vocabulary_model(tmp_path / "two", ["x", "y", "s", "r"], added=["<t>"])
    rows = {m.resolve(): count for m, count in ((base, 3), (one, 4), (two, 5))}
    plan = plan_tokenizer("test", "union", [one, two], base, {}, rows, pad_to_multiple_of=4)
    assert plan.vocab == {"x": 0, "y": 1, "z": 2, "q": 3, "s": 4, "r": 5, "<t>": 6} and plan.rows == 8
    assert [entry["content"] for entry in plan.new_added] == ["q", "s", "r", "<t>"]
    assert plan.new_added[0]["normalized"] and not plan.new_added[0]["special"] and plan.new_added[3]["special"]
    tensors = [
        torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]),  # one: y x q s
        torch.tensor([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0], [70.0, 80.0], [90.0, 100.0]]),  # two
        torch.tensor([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]]),
    ]  # base: x y z
    new_one, new_two, new_base = plan.rebuild(tensors, [one, two, base], base)
    assert new_one[:7].tolist() == [[3, 4], [1, 2], [-5, -6], [5, 6], [7, 8], [70, 80], [90, 100]]
    assert new_two[:7].tolist() == [[10, 20], [30, 40], [-5, -6], [5, 6], [50, 60], [70, 80], [90, 100]]
    # s: in one and two, not in the base: the mean of their rows
    assert new_base[:7].tolist() == [[-1, -2], [-3, -4], [-5, -6], [5, 6], [28.5, 34], [70, 80], [90, 100]]
    assert new_base[7].tolist() == new_base[:7].mean(dim=0).tolist()
    # a source vocabulary with a token no model has: zeros
    donor = _vocabulary_model(tmp_path / "donor", ["x", "none"])
    plan = plan_tokenizer("test", donor, [one, two], None, {}, rows)
    assert plan.rebuild(tensors[:2], [one, two], None)[0].tolist() == [[3, 4], [0, 0]]


def test_tokenizer_source_drops_padding_rows(tmp_path):
    """Embeddings padded past the tokenizer (vocab_size 101, 64 tokens) come out with one row per
    token, as mergekit's; config.json's vocab_size follows."""
    padded = make_checkpoint(tmp_path / "padded", layers=2, seed=1)  # vocab_size 101 rows
    other = make_checkpoint(tmp_path / "other", layers=2, seed=2)
    for directory in (padded, other):
        tiny.write_tokenizer(directory)  # 64 tokens
    out = merge([padded, other], tmp_path / "out", method="linear", tokenizer_source="union")
    merged, first, second = tensors(out), tensors(padded), tensors(other)
    embedding = "model.embed_tokens.weight"
    assert merged[embedding].shape[0] == 64 and json.loads((out / "config.json").read_text())["vocab_size"] == 64
    assert torch.equal(merged[embedding], ((first[embedding][:64] + second[embedding][:64]) / 2))


def test_tokenizer_tokens_entries_that_cannot_be_met_are_refused_before_work(models, tmp_path):
    """mergekit's tokenizer: tokens: block (parity: tests/test_merge_mergekit.py) when an entry cannot be met."""
    from solar_kernels.merge.tokenizer import TokenSource

    kwargs = dict(method="ties", base_model=models / "base", density=0.5)
    cases = {
        "a source that is not merged": (
            {"w3": TokenSource("model", models / "c", force=True)},
            r"tokens\['w3'\]: source model .*/c is not one of the models merged",
        ),
        "a source without the token": (
            {"<x>": TokenSource("model", models / "a")},
            r"tokens\['<x>'\]: source model .*/a has no token '<x>'",
        ),
        "a row past the source's rows": (
            {"<x>": TokenSource("model_token", models / "a", token_id=64)},
            r"tokens\['<x>'\]: token_id must be below the 64 rows of .*/a, got 64",
        ),
        "a source token it lacks": (
            {"<x>": TokenSource("model_token", models / "a", token="<y>")},
            r"tokens\['<x>'\]: source model .*/a has no token '<y>'",
        ),
        "no source where one is needed": (
            {"w3": TokenSource(None, force=True)},
            r"tokens\['w3'\]: a source is needed \(force: true is set\), got none",
        ),
    }
    for tokens, message in cases.values():
        with pytest.raises(ValueError, match=message):
            merge([models / "a", models / "b"], tmp_path / "out", tokenizer_source="union", tokens=tokens, **kwargs)
    with pytest.raises(
        ValueError,
        match=r"tokens: '<x>' is not in the base vocabulary; adding tokens to source: base "
        r"is not supported \(mergekit 0.1.5 fails on it\), use source: union",
    ):
        merge(
            [models / "a", models / "b"],
            tmp_path / "out",
            tokenizer_source="base",
            tokens={"<x>": TokenSource("zero")},
            **kwargs,
        )
    with pytest.raises(ValueError, match=r"tokens applies with tokenizer_source only"):
        merge([models / "a", models / "b"], tmp_path / "out", tokens={"w3": TokenSource("zero")}, **kwargs)
    assert not (tmp_path / "out").exists()


def test_card_recipe_of_a_tokenizer_block_reruns_the_same(models, tmp_path, monkeypatch):
    """A merge given as arguments with pad_to_multiple_of and tokens writes mergekit's tokenizer: block
    into its recipe, which reads back to the same merge."""
    from solar_kernels.merge.tokenizer import TokenSource

    monkeypatch.chdir(tmp_path)
    tokens = {"<x>": TokenSource("model_token", models / "a", token="<s>"), "w3": TokenSource("zero", force=True)}
    out = merge(
        [models / "a", models / "b"],
        tmp_path / "out",
        method="ties",
        base_model=models / "base",
        density=0.5,
        tokenizer_source="union",
        pad_to_multiple_of=16,
        tokens=tokens,
    )
    again = merge_from_yaml(out / "mergekit_config.yml", tmp_path / "again")
    assert tensors(again).keys() == tensors(out).keys()
    assert all(torch.equal(tensors(again)[name], tensor) for name, tensor in tensors(out).items())
    merged = tensors(out)["model.embed_tokens.weight"]
    assert merged.shape[0] == 80 and not merged[3].any()  # 65 tokens padded to 80; w3 forced to zeros
    assert torch.equal(merged[64], tensors(models / "a")["model.embed_tokens.weight"][1])  # <x>: a's <s> row
