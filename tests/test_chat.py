"""``solar generate`` / ``solar chat`` (solar_kernels/chat.py) on a tiny converted GGUF model."""

from __future__ import annotations

import argparse
import io
import json

import pytest
import torch

pytest.importorskip("gguf", reason="the tiny test model is written as a GGUF file (pip install gguf)")
pytest.importorskip("transformers", reason="the tokenizer loads through transformers")

from solar_kernels import chat, convert  # noqa: E402
from solar_kernels.cli import build_parser  # noqa: E402
from solar_kernels.model import generate, load_pretrained  # noqa: E402
from tests.helpers import write_tiny_gguf  # noqa: E402


class Recorder(io.StringIO):
    """stdout that remembers each write, to see the text arrive piece by piece."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def _parse(command: str, argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args([command, *argv])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model converted from GGUF: its directory, tokenizer and loaded model."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("chat")
    write_tiny_gguf(root / "tiny.gguf", "F32", seed=3, std=0.1)  # at 0.02 greedy decoding repeats one token
    convert.convert_gguf(root / "tiny.gguf", root / "hf")
    return (
        root / "hf",
        AutoTokenizer.from_pretrained(root / "hf", trust_remote_code=False),
        load_pretrained(root / "hf", backend="torch").eval(),
    )


def _greedy(model, prompt: list[int], steps: int, eos: int = -1) -> list[int]:
    return generate(model, [prompt], steps, eos_token_id=eos)[0]


def _text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def _first_new_token(tokens: list[int]) -> int:
    """The first step (>= 2) whose token did not occur before it, before any real eos (id 2): a
    stop token there cuts the reply short."""
    end = tokens.index(2) if 2 in tokens else len(tokens)
    return next(k for k in range(2, end) if tokens[k] not in tokens[:k])


def _set_eos(directory, eos) -> None:
    path = directory / "generation_config.json"
    generation = json.loads(path.read_text())
    generation["eos_token_id"] = eos
    path.write_text(json.dumps(generation))


def test_generate_streams_greedy_tokens_of_model_generate(tiny, capsys):
    path, tokenizer, model = tiny
    prompt_text = "The capital of France is"
    expected = _greedy(model, tokenizer(prompt_text).input_ids, 12, eos=2)
    out = Recorder()
    args = _parse("generate", [str(path), prompt_text, "--max-new-tokens", "12", "--backend", "torch"])
    assert chat.run(args, stdout=out) == 0
    text = _text(tokenizer, [t for t in expected if t != 2])
    assert out.getvalue() == text + "\n"
    assert len([w for w in out.writes if w]) > 2  # streamed, not written once at the end


def test_stream_tokens_equals_generate_greedy_and_sampled(tiny):
    _, tokenizer, model = tiny
    prompt = tokenizer("There are 1234 apples").input_ids
    greedy = list(chat.stream_tokens(model, prompt, chat.Sampling(max_new_tokens=10), set()))
    assert greedy == _greedy(model, prompt, 10)
    sampling = chat.Sampling(max_new_tokens=10, temperature=0.8, top_k=50, top_p=0.9, seed=7)
    sampled = list(chat.stream_tokens(model, prompt, sampling, set()))
    reference = generate(
        model,
        [prompt],
        10,
        temperature=0.8,
        top_k=50,
        top_p=0.9,
        eos_token_id=-1,
        generator=torch.Generator().manual_seed(7),
    )[0]
    assert sampled == reference
    assert sampled != greedy


def test_generate_stops_at_generation_config_eos(tmp_path, tiny):
    import shutil

    path, tokenizer, model = tiny
    prompt = tokenizer("hello, world").input_ids
    tokens = _greedy(model, prompt, 16)
    stop = _first_new_token(tokens)
    local = tmp_path / "hf"
    shutil.copytree(path, local)
    _set_eos(local, [tokens[stop], 2])
    out = io.StringIO()
    assert (
        chat.run(
            _parse("generate", [str(local), "hello, world", "--max-new-tokens", "16", "--backend", "torch"]), stdout=out
        )
        == 0
    )
    assert out.getvalue() == _text(tokenizer, tokens[:stop]) + "\n"
    assert _text(tokenizer, tokens[:stop]) != _text(tokenizer, tokens)


def test_chat_keeps_history_under_the_template(tmp_path, tiny):
    import shutil

    path, tokenizer, model = tiny
    first, second = "hello there", "and 12 more?"
    turn = [{"role": "user", "content": first}]
    reply_tokens = _greedy(model, chat.chat_prompt(tokenizer, turn), 12)
    stop = _first_new_token(reply_tokens)
    eos = reply_tokens[stop]
    local = tmp_path / "hf"
    shutil.copytree(path, local)
    _set_eos(local, eos)
    reply1 = _text(tokenizer, reply_tokens[:stop])
    history = [*turn, {"role": "assistant", "content": reply1}, {"role": "user", "content": second}]
    prompt2 = chat.chat_prompt(tokenizer, history)
    assert tokenizer.decode(prompt2, skip_special_tokens=False).startswith(
        f"<|im_start|>user\n{first}<|im_end|>\n<|im_start|>assistant\n{reply1}"
    )
    expected2 = _greedy(model, prompt2, 12, eos=eos)
    reply2 = _text(tokenizer, [t for t in expected2 if t != eos])
    without_history = _greedy(model, chat.chat_prompt(tokenizer, [{"role": "user", "content": second}]), 12, eos=eos)
    assert expected2 != without_history  # so the output below shows that the history was used
    out = io.StringIO()
    args = _parse("chat", [str(local), "--max-new-tokens", "12", "--backend", "torch"])
    assert chat.run(args, stdin=io.StringIO(f"{first}\n\n{second}\n"), stdout=out) == 0
    assert out.getvalue() == f"{reply1}\n{reply2}\n"


def test_chat_loop_returns_the_conversation(tiny):
    _, tokenizer, model = tiny
    messages = chat.chat_loop(
        model, tokenizer, ["hi\n", "bye\n"], io.StringIO(), chat.Sampling(max_new_tokens=3), {2}, system="be brief"
    )
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [messages[1]["content"], messages[3]["content"]] == ["hi", "bye"]


def test_bad_inputs_are_one_line_errors(tmp_path, tiny, capsys):
    path, _, _ = tiny

    def error_of(command: str, argv: list[str], stdin: str = "") -> str:
        assert chat.run(_parse(command, argv), stdin=io.StringIO(stdin), stdout=io.StringIO()) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"solar {command}: error: ")
        return err

    assert "not a checkpoint directory" in error_of("generate", [str(tmp_path / "missing"), "hi"])
    (tmp_path / "empty").mkdir()
    assert "config.json is missing" in error_of("chat", [str(tmp_path / "empty")])
    assert "--top-p must be in (0, 1], got 1.5" in error_of("generate", [str(path), "hi", "--top-p", "1.5"])
    assert "--max-new-tokens must be >= 1, got 0" in error_of("chat", [str(path), "--max-new-tokens", "0"])
    assert "empty prompt" in error_of("generate", [str(path)], stdin="  \n")
    import shutil

    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(path, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    assert "no tokenizer (expected tokenizer.json or tokenizer.model" in error_of("generate", [str(no_tokenizer), "hi"])
    remote = tmp_path / "remote"
    shutil.copytree(path, remote)
    config = json.loads((remote / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.Tokenizer", None]}
    (remote / "tokenizer_config.json").write_text(json.dumps(config))
    assert "names remote code (auto_map), which is never run" in error_of("chat", [str(remote)], stdin="hi\n")
    no_template = tmp_path / "no_template"
    shutil.copytree(path, no_template)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    assert "has no chat template" in error_of("chat", [str(no_template)], stdin="hi\n")


def test_a_plain_fast_tokenizer_loads_without_autotokenizer_and_gives_its_ids(tiny, tmp_path):
    import shutil
    import subprocess
    import sys

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path, reference, _ = tiny
    assert chat.auto_tokenizer_class(path) is PreTrainedTokenizerFast  # solar convert writes the plain class
    text = "Hello world 12345, <|im_end|> again"
    loaded = chat.load_tokenizer(path)
    assert type(loaded) is type(reference)  # the class AutoTokenizer picks for it
    assert loaded(text).input_ids == reference(text).input_ids
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.chat_template) == (
        reference.bos_token_id,
        reference.eos_token_id,
        reference.chat_template,
    )
    # another tokenizer_class (or none) still goes through AutoTokenizer
    other = tmp_path / "other"
    shutil.copytree(path, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizer"}))
    assert chat.auto_tokenizer_class(other) is AutoTokenizer
    (other / "tokenizer_config.json").unlink()
    assert chat.auto_tokenizer_class(other) is AutoTokenizer
    # the point of it: none of the modules AutoTokenizer imports (0.30 GiB resident) come with it
    script = (
        "import sys; from solar_kernels.chat import load_tokenizer; load_tokenizer(sys.argv[1]); "
        "print(sorted(m for m in ('sklearn', 'transformers.models.auto', 'transformers.generation') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
