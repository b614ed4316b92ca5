"""`solar demo`: its output folder rules, `--write-data`, the toy's quick run end to end, which recipe
`--toy`/`--quick`/the default run, `--publish` and the README's demo section generated from
docs/demo/report.md (whose format tests/training/test_demo_real.py checks)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml

from solar_kernels.cli import main
from training import demo, demo_real, plots

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "training" / "configs"
COMMITTED_REPORT = ROOT / "docs" / "demo" / "report.md"
STALE = "regenerate it: make demo-report (solar demo, then solar demo --publish runs/demo)"


# ----------------------------------------------------------------------------- the output folder


def test_demo_refuses_a_non_empty_folder_it_did_not_make(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"solar demo: error: {out} is not empty and was not made by solar demo" in error
    assert "--force" in error and error.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_demo_out_dot_never_deletes_the_current_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "project.txt").write_text("work")
    (tmp_path / "src").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--out", "."]) == 2
    assert "is not empty and was not made by solar demo" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project.txt", "src"]


def test_force_writes_into_a_new_subfolder_and_touches_nothing(tmp_path):
    (tmp_path / "project.txt").write_text("work")
    first = demo.prepare_output(tmp_path, demo.RUN_OUTPUTS, force=True)
    second = demo.prepare_output(tmp_path, demo.RUN_OUTPUTS, force=True)
    assert (first, second) == (tmp_path / "solar-demo-1", tmp_path / "solar-demo-2")
    assert (first / demo.MARKER).is_file() and (second / demo.MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project.txt", "solar-demo-1", "solar-demo-2"]


def test_a_folder_with_the_marker_loses_only_the_demos_previous_outputs(tmp_path):
    out = demo.prepare_output(tmp_path / "run", demo.RUN_OUTPUTS)
    assert out == tmp_path / "run" and json.loads((out / demo.MARKER).read_text())["written_by"] == "solar demo"
    (out / "base").mkdir()
    (out / "base" / "model.safetensors").write_text("old")
    (out / "report.md").write_text("old report")
    (out / "my-notes.md").write_text("mine")
    (tmp_path / "elsewhere").mkdir()
    (out / "sft").symlink_to(tmp_path / "elsewhere")  # a link is removed, never followed
    assert demo.prepare_output(out, demo.RUN_OUTPUTS) == out
    assert sorted(p.name for p in out.iterdir()) == [demo.MARKER, "my-notes.md"]
    assert (tmp_path / "elsewhere").is_dir()


def test_an_empty_folder_is_used_and_a_file_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    assert demo.prepare_output(tmp_path / "empty", demo.DATA_FILES) == tmp_path / "empty"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="file is a file; expected a folder"):
        demo.prepare_output(tmp_path / "file", demo.DATA_FILES, force=True)


def test_write_data_writes_every_file_the_tiny_configs_read(tmp_path, capsys):
    target = tmp_path / "tiny-data"
    assert main(["demo", "--write-data", str(target), "--quick"]) == 0
    assert str(target) in capsys.readouterr().out
    named = []
    for config in sorted(CONFIGS.glob("tiny_*.yaml")):
        sections = yaml.safe_load(config.read_text())
        paths = [
            sections["model"].get("tokenizer"),
            sections["data"].get("train"),
            *sections.get("dpo", {}).get("stages", []),
        ]
        named += [p for p in paths if p and p.startswith("runs/tiny-data/")]
    assert len(named) == 5, named  # tokenizer, corpus, SFT, and both sDPO stages
    for path in named:
        written = target / path.removeprefix("runs/tiny-data/")
        assert written.exists(), f"{path} (named in a tiny config) is not written by --write-data"
    rows = [json.loads(line) for line in (target / "math_pref_hard.jsonl").read_text().splitlines()]
    assert rows and all({"prompt", "chosen", "rejected"} <= set(r) and r["difficulty"] == 2 for r in rows)
    assert (target / "tokenizer" / "tokenizer.json").is_file()
    # a second --write-data into its own folder replaces its files
    assert main(["demo", "--write-data", str(target), "--quick", "--seed", "1"]) == 0
    assert [json.loads(line) for line in (target / "math_pref_hard.jsonl").read_text().splitlines()] != rows


# ----------------------------------------------------------------------------- the quick run


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    # The tests run Triton through its interpreter; the demo on a CPU uses the torch backend.
    # One torch thread and CPU seconds, not wall time: a shared CI machine's load does not count.
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("SOLAR_KERNELS_BACKEND", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("quick") / "demo"
    started = time.process_time()
    try:
        code = main(["demo", "--quick", "--out", str(out)])
    finally:
        monkeypatch.undo()
        torch.set_num_threads(threads)
    assert code == 0
    return out, time.process_time() - started


def test_quick_demo(quick_run, capsys):
    out, seconds = quick_run
    results = json.loads((out / "results.json").read_text())
    assert set(results["held_out_loss"]) == {"base", "upscaled", "continued"}
    assert set(results["answer_accuracy"]) == {"before SFT", "after SFT", "after sDPO", "after DPO", "merged (0.5/0.5)"}
    assert set(results["preference_accuracy"]) == {"SFT", "sDPO", "DPO", "merged"}
    stages = results["stages"]
    assert stages["SFT"]["last_loss"] < stages["SFT"]["first_loss"]
    assert stages["base pretraining"]["last_loss"] < stages["base pretraining"]["first_loss"]
    for name in ("upscaled", "merged", "sdpo/final", "dpo/final"):
        assert (out / name / "config.json").exists()
    assert json.loads((out / "upscaled" / "config.json").read_text())["num_hidden_layers"] == 6
    report = (out / "report.md").read_text()
    assert report == demo.render_report(results, list(plots.DEMO_PLOTS))
    for name in plots.DEMO_PLOTS:
        assert f"![{name}]({name})" in report and (out / name).read_bytes()[:4] == b"\x89PNG"
    assert (out / demo.MARKER).is_file()
    assert seconds < 180, f"--quick took {seconds:.0f} s of CPU"  # about a minute


def test_toy_runs_the_synthetic_recipe_and_the_default_the_real_one(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: calls.append(("toy", out, kw)) or _report(tmp_path))
    monkeypatch.setattr(
        demo_real, "run_real_demo", lambda out, **kw: calls.append(("real", out, kw)) or _report(tmp_path)
    )
    assert main(["demo", "--toy", "--out", str(tmp_path / "a")]) == 0
    assert main(["demo", "--quick", "--out", str(tmp_path / "b")]) == 0
    assert main(["demo", "--out", str(tmp_path / "c"), "--cache", str(tmp_path / "cache")]) == 0
    assert calls == [
        ("toy", tmp_path / "a", dict(quick=False, seed=0, force=False)),
        ("toy", tmp_path / "b", dict(quick=True, seed=0, force=False)),
        ("real", tmp_path / "c", dict(cache=tmp_path / "cache", seed=0, force=False)),
    ]


def _report(folder: Path) -> Path:
    (folder / "report.md").write_text("# report\n")
    return folder / "report.md"


def _readme_block(text: str) -> str:
    start, end = text.index(demo.README_START) + len(demo.README_START) + 1, text.index(demo.README_END)
    return text[start:end]


def test_readme_demo_section_is_generated_from_the_committed_report():
    block = _readme_block((ROOT / "README.md").read_text())
    title = block.splitlines()[0]
    assert " — " in title, f"the README's demo block starts with {title!r}, not a title with a note: {STALE}"
    note = title.split(" — ", 1)[1]
    assert block == demo.readme_section(COMMITTED_REPORT.read_text(), note), (
        f"README.md's demo section is not docs/demo/report.md's: {STALE}"
    )


def test_publish_copies_the_run_and_rewrites_only_the_readme_block(quick_run, tmp_path):
    out, _ = quick_run
    docs = tmp_path / "docs" / "demo"
    docs.mkdir(parents=True)
    (docs / "accuracy.png").write_bytes(b"an old plot")
    readme = tmp_path / "README.md"
    before, after = "# Project\n\nintro\n\n", "\nWhat the run shows.\n"
    readme.write_text(f"{before}{demo.README_START}\nold report\n{demo.README_END}{after}")
    with pytest.raises(ValueError, match="is a 'quick' run; expected a real run"):
        demo.publish(out, docs, readme, note="test machine")
    assert (docs / "accuracy.png").exists() and "old report" in readme.read_text()  # nothing written
    assert demo.publish(out, docs, readme, note="test machine", require_full=False) == docs / "report.md"
    report = (out / "report.md").read_text()
    assert (docs / "report.md").read_text() == report
    assert sorted(p.name for p in docs.iterdir()) == sorted(["report.md", *plots.DEMO_PLOTS])
    text = readme.read_text()
    assert text.startswith(before + demo.README_START + "\n") and text.endswith(demo.README_END + after)
    block = _readme_block(text)
    assert block == demo.readme_section(report, "test machine", "docs/demo/")
    assert block.splitlines()[0].startswith("#### SOLAR recipe demo (quick,") and " — test machine" in block
    assert "![losses.png](docs/demo/losses.png)" in block


def test_publish_refuses_a_folder_without_a_report(tmp_path):
    with pytest.raises(ValueError, match="report.md does not exist; expected a finished solar demo run"):
        demo.publish(tmp_path, tmp_path / "docs", tmp_path / "README.md")


def test_demo_help_shows_the_folder_rules_and_write_data(capsys):
    assert main(["demo", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--write-data DIR" in help_text and "--publish RUN_DIR" in help_text
    assert f"made by solar demo (it holds {demo.MARKER}" in help_text and "new subfolder solar-demo-N" in help_text
