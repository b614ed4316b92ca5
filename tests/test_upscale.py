from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from solar_kernels import checkpoint
from solar_kernels.checkpoint import PARTIAL_MARKER, CheckpointError, CheckpointReader
from solar_kernels.upscale import Slice, depth_upscale, parse_slices, upscale_from_yaml
from tests.helpers import break_shard_writer, make_checkpoint, tensors


@pytest.fixture
def base(tmp_path):
    return make_checkpoint(tmp_path / "base")


def test_solar_layer_map(base, tmp_path):
    """docs/method.md#dus-layer-plan with n = 6, m = 2: new[i] = base[i] for i < 4, base[i - 4 + 2] after."""
    report = depth_upscale(base, tmp_path / "up", drop=2, max_shard_size="40KB")
    assert report.num_layers == 8
    src, out = tensors(base), tensors(tmp_path / "up")
    n, m = 6, 2
    for i in range(2 * (n - m)):
        j = i if i < n - m else i - (n - m) + m
        for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(out[f"model.layers.{i}.{suffix}"], src[f"model.layers.{j}.{suffix}"])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(out[name], src[name])
    assert len(out) == len(src) + 2 * 9  # two more layers of 9 tensors
    config = json.loads((tmp_path / "up" / "config.json").read_text())
    assert config["num_hidden_layers"] == 8
    assert (tmp_path / "up" / "tokenizer_config.json").read_text() == '{"model_max_length": 128}'
    assert (tmp_path / "up" / "generation_config.json").exists()
    assert (tmp_path / "up" / "model.safetensors.index.json").exists()


def test_transformers_loads_and_runs_the_result(base, tmp_path):
    from transformers import AutoModelForCausalLM

    depth_upscale(base, tmp_path / "up", drop=2)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "up", trust_remote_code=False)
    assert model.config.num_hidden_layers == 8
    logits = model(torch.randint(0, 101, (1, 7))).logits
    assert logits.shape == (1, 7, 101) and torch.isfinite(logits).all()


def test_bytes_are_exact_copies(base, tmp_path):
    depth_upscale(base, tmp_path / "up", drop=2)
    src, out = tensors(base), tensors(tmp_path / "up")
    assert (
        out["model.layers.4.mlp.gate_proj.weight"].numpy().tobytes()
        == src["model.layers.2.mlp.gate_proj.weight"].numpy().tobytes()
    )
    assert out["lm_head.weight"].dtype == torch.float32


def test_dtype_conversion(base, tmp_path):
    depth_upscale(base, tmp_path / "up", drop=1, dtype="bfloat16")
    reader = CheckpointReader(tmp_path / "up")
    assert {reader.dtype(n) for n in reader.names()} == {torch.bfloat16}
    config = json.loads((tmp_path / "up" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    src = tensors(base)
    assert torch.equal(
        reader.get("model.layers.5.mlp.up_proj.weight"), src["model.layers.1.mlp.up_proj.weight"].bfloat16()
    )  # new[5] = base[5 - 5 + 1]


def test_slices_from_two_checkpoints(tmp_path):
    a = make_checkpoint(tmp_path / "a", seed=1)
    b = make_checkpoint(tmp_path / "b", seed=2)
    depth_upscale(None, tmp_path / "ab", slices=parse_slices(f"{a}:0:3,{b}:1:6", a))
    out, ta, tb = tensors(tmp_path / "ab"), tensors(a), tensors(b)
    assert torch.equal(out["model.layers.2.self_attn.v_proj.weight"], ta["model.layers.2.self_attn.v_proj.weight"])
    assert torch.equal(out["model.layers.3.self_attn.v_proj.weight"], tb["model.layers.1.self_attn.v_proj.weight"])
    assert torch.equal(out["model.embed_tokens.weight"], ta["model.embed_tokens.weight"])  # first slice's
    assert torch.equal(out["model.norm.weight"], tb["model.norm.weight"])  # last slice's
    assert torch.equal(out["lm_head.weight"], tb["lm_head.weight"])


def test_mergekit_passthrough_yaml(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # model paths are relative to the working directory, as in mergekit
    (tmp_path / "dus.yml").write_text(
        "slices:\n"
        "  - sources:\n      - model: base\n        layer_range: [0, 4]\n"
        "  - sources:\n      - model: base\n        layer_range: [2, 6]\n"
        "merge_method: passthrough\ndtype: float16\n"
    )
    report = upscale_from_yaml(tmp_path / "dus.yml", tmp_path / "up")
    assert report.num_layers == 8
    reader = CheckpointReader(tmp_path / "up")
    assert reader.dtype("model.layers.7.mlp.up_proj.weight") == torch.float16
    direct = depth_upscale(base, tmp_path / "direct", drop=2, dtype="float16")
    assert direct.num_layers == 8 and tensors(tmp_path / "up").keys() == tensors(tmp_path / "direct").keys()


def test_parse_slices():
    assert parse_slices("0:24,8:32", "m") == [Slice(Path("m"), 0, 24), Slice(Path("m"), 8, 32)]
    assert parse_slices("/x/a:0:3, b:2:5", "m") == [Slice(Path("/x/a"), 0, 3), Slice(Path("b"), 2, 5)]
    with pytest.raises(ValueError, match="expected START:END or PATH:START:END"):
        parse_slices("0-24", "m")


@pytest.mark.parametrize(
    "drop, message", [(0, "got 0"), (-1, "got -1"), (3, r"0 < drop < n/2 = 3 .* got 3"), (2.5, "got 2.5")]
)
def test_bad_drop(base, tmp_path, drop, message):
    with pytest.raises(ValueError, match=message):
        depth_upscale(base, tmp_path / "up", drop=drop)
    assert not (tmp_path / "up").exists()


def test_slice_out_of_range(base, tmp_path):
    with pytest.raises(ValueError, match=r"slice 4:7 is outside the 6 layers of"):
        depth_upscale(None, tmp_path / "up", slices=parse_slices("0:4,4:7", base))


def test_mismatched_architectures(base, tmp_path):
    other = make_checkpoint(tmp_path / "other", intermediate_size=64)
    with pytest.raises(ValueError, match=r"checkpoints differ in intermediate_size: 100 in .* vs 64 in"):
        depth_upscale(None, tmp_path / "up", slices=parse_slices(f"{base}:0:3,{other}:3:6", base))


def test_missing_shard_and_corrupt_header(base, tmp_path):
    shards = sorted(base.glob("model-*.safetensors"))
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    (broken / shards[-1].name).unlink()
    with pytest.raises(CheckpointError, match=f"{shards[-1].name}: file is missing"):
        depth_upscale(broken, tmp_path / "up", drop=1)
    shutil.copy(shards[-1], broken / shards[-1].name)
    (broken / shards[0].name).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        depth_upscale(broken, tmp_path / "up", drop=1)
    assert not (tmp_path / "up").exists()


def test_existing_destination_and_force(base, tmp_path):
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="already exists"):
        depth_upscale(base, tmp_path / "up", drop=2)
    assert (tmp_path / "up" / "notes.txt").read_text() == "keep"
    depth_upscale(base, tmp_path / "up", drop=2, force=True)
    assert json.loads((tmp_path / "up" / "config.json").read_text())["num_hidden_layers"] == 8


def test_failure_midway_leaves_nothing(base, tmp_path, monkeypatch):
    break_shard_writer(monkeypatch, 20, OSError("disk went away"))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(OSError, match="disk went away"):
        depth_upscale(base, tmp_path / "up", drop=2, max_shard_size="10KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_not_enough_disk(base, tmp_path, monkeypatch):
    import solar_kernels.checkpoint as checkpoint

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(CheckpointError, match=r"not enough disk space for .*up: needs about"):
        depth_upscale(base, tmp_path / "up", drop=2)
    assert not (tmp_path / "up").exists()


def test_yaml_errors(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yml"
    slice_text = "slices:\n  - sources:\n      - {model: base, layer_range: [0, 4]}\n"
    cases = [
        ("slices: []\nmerge_method: passthrough\n", r"give exactly one of models or slices \(a non-empty list\)"),
        (
            "models: [{model: base}, {model: base}]\nmerge_method: linear\n",
            r"depth up-scaling takes merge_method: passthrough, got 'linear'",
        ),
        (
            "slices:\n  - sources:\n      - {model: base, layer_range: [0, 4]}\n      - {model: base, layer_range: [0, 4]}\n"
            "merge_method: passthrough\n",
            r"slices\[0\] must have exactly one source for passthrough, got 2",
        ),
        # Keys mergekit has that are not implemented here are refused, never ignored (issue 13).
        (
            slice_text + "merge_method: passthrough\ntokenizer_source: base\n",
            r"tokenizer_source: base needs base_model",
        ),
        (
            slice_text + "merge_method: passthrough\ntokenizer: {source: union, tokens: {w3: {source: {kind: one}}}}\n",
            r"tokenizer: tokens\['w3'\]: source must be a model path",
        ),
        (
            slice_text + "merge_method: passthrough\nparameters: {weight: 0.5}\n",
            r"parameters: parameter 'weight' does not apply to passthrough; expected scale",
        ),
        (
            "slices:\n  - sources:\n      - {model: base, layer_range: [0, 4], parameters: {density: 1}}\n"
            "merge_method: passthrough\n",
            r"slices\[0\]\.sources\[0\] parameters: parameter 'density' does not apply",
        ),
        (
            slice_text + "merge_method: passthrough\nparameters: {scale: [{filter: o_proj, vale: 0}]}\n",
            r"unknown key 'vale'; expected filter and value",
        ),
        (slice_text + "merge_method: passthrough\nchat_template: chatml\n", r"key 'chat_template' is not supported"),
        (slice_text + "merge_method: passthrough\nsome_key: 1\n", r"unknown key 'some_key'"),
    ]
    for text, message in cases:
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            upscale_from_yaml(bad, tmp_path / "up")
        assert not (tmp_path / "up").exists()


def test_base_model_gives_config_and_tokenizer(base, tmp_path, monkeypatch):
    """As mergekit: with base_model, config.json and the tokenizer are the base's, not the first slice's."""
    other = make_checkpoint(tmp_path / "other", seed=3)
    (other / "tokenizer_config.json").write_text('{"model_max_length": 77}')
    config = json.loads((other / "config.json").read_text())
    config["bos_token_id"] = 5
    (other / "config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dus.yml").write_text(
        "slices:\n  - sources:\n      - {model: base, layer_range: [0, 4]}\n"
        "merge_method: passthrough\nbase_model: other\n"
    )
    upscale_from_yaml(tmp_path / "dus.yml", tmp_path / "up")
    assert json.loads((tmp_path / "up" / "tokenizer_config.json").read_text()) == {"model_max_length": 77}
    written = json.loads((tmp_path / "up" / "config.json").read_text())
    assert written["bos_token_id"] == 5 and written["num_hidden_layers"] == 4
    assert torch.equal(
        tensors(tmp_path / "up")["model.embed_tokens.weight"], tensors(base)["model.embed_tokens.weight"]
    )
    card = (tmp_path / "up" / "README.md").read_text()
    assert "base_model: other" in card and "passthrough" in card


def test_scale_parameter_zeroes_filtered_tensors(base, tmp_path):
    """mergekit's passthrough ``scale``: o_proj and down_proj of the second slice zeroed, the rest kept."""
    slices = [
        Slice(base, 0, 3),
        Slice(
            base,
            3,
            6,
            source_parameters={
                "scale": [{"filter": "o_proj", "value": 0}, {"filter": "down_proj", "value": 0}, {"value": 1}]
            },
        ),
    ]
    depth_upscale(None, tmp_path / "up", slices=slices, parameters={"scale": 0.5})
    src, out = tensors(base), tensors(tmp_path / "up")
    for layer in range(3, 6):
        for suffix in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            assert not out[f"model.layers.{layer}.{suffix}"].any()
        assert torch.equal(
            out[f"model.layers.{layer}.mlp.up_proj.weight"], src[f"model.layers.{layer}.mlp.up_proj.weight"]
        )
    # the first slice has no scale of its own: the top-level 0.5 applies
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], src["model.layers.0.mlp.up_proj.weight"] * 0.5)


def test_parameters_are_checked_as_a_merge_checks_them(base, tmp_path):
    """depth_upscale's parameters go through the merge's check: any mapping is taken, anything else
    is refused with the merge's message before anything is written."""
    from types import MappingProxyType

    depth_upscale(None, tmp_path / "up", slices=[Slice(base, 0, 6)], parameters=MappingProxyType({"scale": 0.5}))
    name = "model.layers.2.mlp.up_proj.weight"
    assert torch.equal(tensors(tmp_path / "up")[name], tensors(base)[name] * 0.5)
    with pytest.raises(
        ValueError,
        match=r"^depth_upscale: parameters: expected a mapping of parameter names to "
        r"values, got \[\('scale', 0\.5\)\]$",
    ):
        depth_upscale(None, tmp_path / "refused", slices=[Slice(base, 0, 6)], parameters=[("scale", 0.5)])
    assert not (tmp_path / "refused").exists()


# ----------------------------------------------------------------------------------------------
# Nothing a user has is lost (issue 9)
# ----------------------------------------------------------------------------------------------


def _contents(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["same", "same_via_dotdot", "symlink", "inside", "contains"])
def test_destination_in_or_around_the_source_is_refused(base, tmp_path, where):
    (tmp_path / "link").symlink_to(base)
    dst, relation = {
        "same": (base, "is"),
        "same_via_dotdot": (base / ".." / "base", "is"),
        "symlink": (tmp_path / "link", "is"),
        "inside": (base / "up", "is inside"),
        "contains": (tmp_path, "contains"),
    }[where]
    before = _contents(base)
    with pytest.raises(ValueError, match=rf"destination {dst} {relation} the source checkpoint {base}"):
        depth_upscale(base, dst, drop=2, force=True)
    assert _contents(base) == before and sorted(p.name for p in tmp_path.iterdir()) == ["base", "link"]


def test_every_slice_source_and_yaml_source_is_protected(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = make_checkpoint(tmp_path / "other", seed=3)
    before = _contents(other)
    with pytest.raises(ValueError, match=rf"destination {other} is the source checkpoint {other}"):
        depth_upscale(None, other, slices=parse_slices(f"{base}:0:3,{other}:3:6", base), force=True)
    (tmp_path / "dus.yml").write_text(
        "slices:\n  - sources:\n      - {model: base, layer_range: [0, 4]}\n"
        "  - sources:\n      - {model: other, layer_range: [2, 6]}\nmerge_method: passthrough\n"
    )
    with pytest.raises(ValueError, match=r"destination .*other/sub is inside the source checkpoint .*other"):
        upscale_from_yaml(tmp_path / "dus.yml", other / "sub")
    assert _contents(other) == before


def _run_killed_upscale(base, dst):
    """An upscale in another process that SIGKILLs itself while writing its third tensor."""
    script = (
        "import os, signal, sys\n"
        "from solar_kernels import checkpoint\n"
        "from solar_kernels.upscale import depth_upscale\n"
        "calls = []\n"
        "original = checkpoint.ShardWriter.add\n"
        "def add(self, name, tensor):\n"
        "    calls.append(name)\n"
        "    if len(calls) == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    original(self, name, tensor)\n"
        "checkpoint.ShardWriter.add = add\n"
        "depth_upscale(sys.argv[1], sys.argv[2], drop=2, max_shard_size='10KB')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(base), str(dst)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == -signal.SIGKILL, done.stderr


def test_stale_partial_output_of_a_killed_run_is_removed(base, tmp_path, caplog):
    dst = tmp_path / "up"
    _run_killed_upscale(base, dst)
    (stale,) = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    marker = json.loads((stale / PARTIAL_MARKER).read_text())
    assert marker["tool"] == "depth_upscale" and marker["host"] == socket.gethostname()
    assert any(p.suffix == ".tmp" for p in stale.iterdir())  # a shard was written before the kill

    def partial(name, **changes):
        folder = tmp_path / f".up.{name}.partial"
        folder.mkdir()
        if changes.get("marker", True):
            (folder / PARTIAL_MARKER).write_text(json.dumps({**marker, **changes}))
        return folder

    kept = [
        partial("alive", pid=os.getpid()),  # its owner is still running
        partial("elsewhere", host=socket.gethostname() + "-other"),  # cannot tell from here
        partial("unmarked", marker=False),  # not made by this package
        partial("other_dst", destination=str(tmp_path / "up2")),  # another destination's
    ]
    (tmp_path / ".up.mine.partial" / "user-file").parent.mkdir()
    (tmp_path / ".up.mine.partial" / "user-file").write_text("not ours")
    kept.append(tmp_path / ".up.mine.partial")
    with caplog.at_level("INFO", logger="solar_kernels.checkpoint"):
        depth_upscale(base, dst, drop=2)
    assert not stale.exists() and all(folder.is_dir() for folder in kept)
    removed = [r.getMessage() for r in caplog.records if "partial output of an interrupted" in r.getMessage()]
    assert removed == [
        f"removed {stale}: the partial output of an interrupted depth_upscale "
        f"(pid {marker['pid']} on {marker['host']}, started {marker['started']})"
    ]
    assert PARTIAL_MARKER not in os.listdir(dst)


def test_marker_names_the_run_while_writing(base, tmp_path, monkeypatch):
    seen = []
    original = checkpoint.ShardWriter.add

    def add(self, name, tensor):
        if not seen:
            seen.append(json.loads((self.directory / PARTIAL_MARKER).read_text()))
        original(self, name, tensor)

    monkeypatch.setattr(checkpoint.ShardWriter, "add", add)
    depth_upscale(base, tmp_path / "up", drop=2)
    (marker,) = seen
    assert (marker["pid"], marker["host"], marker["tool"]) == (os.getpid(), socket.gethostname(), "depth_upscale")
    assert marker["destination"] == str((tmp_path / "up").resolve()) and marker["started"][:2] == "20"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "up"]
    assert PARTIAL_MARKER not in os.listdir(tmp_path / "up")


@pytest.mark.parametrize("existing", [False, True])
def test_ctrl_c_while_writing_removes_the_partial_output(base, tmp_path, monkeypatch, existing):
    if existing:
        (tmp_path / "up").mkdir()
        (tmp_path / "up" / "notes.txt").write_text("keep")
    calls = break_shard_writer(monkeypatch, 12, KeyboardInterrupt())
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(KeyboardInterrupt):
        depth_upscale(base, tmp_path / "up", drop=2, max_shard_size="10KB", force=existing)
    assert len(calls) == 12 and sorted(p.name for p in tmp_path.iterdir()) == before
    if existing:
        assert _contents(tmp_path / "up") == {"notes.txt": b"keep"}


# ----------------------------------------------------------------------------------------------
# Nothing untrusted runs; config.json is checked before any work (issue 9)
# ----------------------------------------------------------------------------------------------


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_remote_code_is_not_copied(base, tmp_path, caplog):
    auto_map = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    _edit_config(base, auto_map=auto_map)
    (base / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 128, "auto_map": {"AutoTokenizer": ["tok_evil.Tok", None]}})
    )
    with caplog.at_level("WARNING", logger="solar_kernels.checkpoint"):
        depth_upscale(base, tmp_path / "up", drop=2)
    assert "auto_map" not in json.loads((tmp_path / "up" / "config.json").read_text())
    assert json.loads((tmp_path / "up" / "tokenizer_config.json").read_text()) == {"model_max_length": 128}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and all("remote code" in w and "dropped auto_map" in w for w in warnings)
    assert any(f"from {base / 'config.json'}:" in w and "modeling_evil.EvilForCausalLM" in w for w in warnings)
    assert any(f"from {base / 'tokenizer_config.json'}:" in w and "tok_evil.Tok" in w for w in warnings)


def test_bad_config_json_is_a_one_line_error(base, tmp_path):
    config_path = base / "config.json"
    good = config_path.read_bytes()
    cases = [
        (b"[1, 2]", r"config.json: expected a JSON object \{\.\.\.\}, got a JSON list"),
        (good[:10] + b"\xff" + good[11:], r"config.json: not UTF-8 text \(byte 0xff at offset 10\)"),
        (
            json.dumps({**json.loads(good), "num_hidden_layers": "4"}).encode(),
            r"config.json: key 'num_hidden_layers': expected int, got str \('4'\)",
        ),
        (
            json.dumps({**json.loads(good), "tie_word_embeddings": 1}).encode(),
            r"key 'tie_word_embeddings': expected bool, got int \(1\)",
        ),
        (json.dumps({**json.loads(good), "hidden_size": True}).encode(), r"key 'hidden_size': expected int, got bool"),
    ]
    for data, message in cases:
        config_path.write_bytes(data)
        with pytest.raises(CheckpointError, match=message) as error:
            depth_upscale(base, tmp_path / "up", drop=2)
        assert "\n" not in str(error.value) and str(config_path) in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_gpt2_checkpoint_is_an_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).save_pretrained(
        tmp_path / "gpt2"
    )
    message = (
        r"depth_upscale: .*gpt2/config.json: unsupported architecture GPT2LMHeadModel; "
        r"expected LlamaForCausalLM or MistralForCausalLM$"
    )
    with pytest.raises(ValueError, match=message):
        depth_upscale(tmp_path / "gpt2", tmp_path / "up", drop=1)
    with pytest.raises(ValueError, match=message):
        depth_upscale(None, tmp_path / "up", slices=parse_slices("0:2,0:2", tmp_path / "gpt2"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


def test_output_modes_follow_the_umask(base, tmp_path):
    (base / "tokenizer_config.json").chmod(0o600)  # a private source file still gives a umask-mode copy
    old = os.umask(0o027)
    try:
        depth_upscale(base, tmp_path / "up", drop=2, max_shard_size="40KB")
    finally:
        os.umask(old)
    out = tmp_path / "up"
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len([n for n in modes if n.endswith(".safetensors")]) > 1 and "tokenizer_config.json" in modes
    assert modes == dict.fromkeys(modes, 0o640) and out.stat().st_mode & 0o777 == 0o750
