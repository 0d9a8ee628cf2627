"""Writes the KJV task data (the .jsonl files next to this script) from the embedded King James
Bible (`dbrx_jax.sft.kjv_path()`):

    python dbrx_jax/evaluation/tasks/kjv/make_data.py [--out_dir DIR]

Every choice is a hash of a verse reference (never Python's `random`, whose sequences may
change between versions), so the files are the same bytes on every run.

- verses_test.jsonl (100) and verses_train.jsonl (10, the few-shot examples): verses of Psalms,
  Proverbs and John cut at the punctuation mark nearest their middle into `prompt` (the
  reference and the first part) and `rest`; `endings` holds the true rest and those of 3 other
  verses of the chapter (or book, when the chapter has too few), each with a leading space,
  the true one at index `label`. Read by kjv_choice and kjv_complete.
- chapters_test.jsonl (16): whole chapters of the same books in the training corpus' document
  format (`dbrx_jax.data.load_documents("kjv")`): "Psalms 23\\n<verse>\\n<verse>...". Read by
  kjv_rolling.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

from dbrx_jax.sft import kjv_path

BOOKS = ("Psalms", "Proverbs", "John")  # away from Genesis 1-10 (the fine-tuning demos')
NUM_TEST, NUM_TRAIN, NUM_CHAPTERS = 100, 10, 16
NUM_CHOICES = 4
CUT_AFTER = (",", ";", ":")
MIN_WORDS, MAX_REST_WORDS = 3, 20  # each part >= 3 words; a rest fits kjv_complete's 48 tokens
CHAPTER_VERSES = (5, 30)  # the chapters kjv_rolling may take: 5 to 30 verses
HERE = os.path.dirname(os.path.abspath(__file__))


def rank(*keys: str) -> str:
    """A fixed pseudo-random sort key for `keys`."""
    return hashlib.sha256("|".join(("kjv-eval", *keys)).encode()).hexdigest()


def cut(text: str) -> tuple[str, str] | None:
    """(first part, rest) cut after the , ; or : nearest the middle of the verse that leaves
    each part MIN_WORDS words and the rest at most MAX_REST_WORDS; None when there is none."""
    words = text.split(" ")
    if " ".join(text.split()) != text:  # irregular spacing: a cut would not join back
        return None
    cuts = [
        i
        for i in range(MIN_WORDS, len(words) - MIN_WORDS + 1)
        if words[i - 1].endswith(CUT_AFTER) and len(words) - i <= MAX_REST_WORDS
    ]
    if not cuts:
        return None
    i = min(cuts, key=lambda i: (abs(2 * i - len(words)), i))
    return " ".join(words[:i]), " ".join(words[i:])


def read_verses() -> list[dict]:
    with open(kjv_path(), encoding="utf-8") as f:
        return [v for v in map(json.loads, f) if v["book"] in BOOKS]


def verse_docs(verses: list[dict]) -> tuple[list[dict], list[dict]]:
    """(test docs, few-shot docs) for kjv_choice and kjv_complete, in the Bible's order."""
    cuts = {}
    for v in verses:
        if (parts := cut(v["text"])) is not None:
            cuts[v["citation"]] = parts
    order = {v["citation"]: i for i, v in enumerate(verses)}
    by_chapter: dict[tuple[str, int], list[str]] = {}
    by_book: dict[str, list[str]] = {}
    for v in verses:
        if v["citation"] in cuts:
            by_chapter.setdefault((v["book"], v["chapter"]), []).append(v["citation"])
            by_book.setdefault(v["book"], []).append(v["citation"])

    def doc(v: dict) -> dict:
        citation = v["citation"]
        first, rest = cuts[citation]
        endings = [rest]
        for pool in (by_chapter[v["book"], v["chapter"]], by_book[v["book"]]):
            for other in sorted(pool, key=lambda c: rank(citation, c)):
                if len(endings) < NUM_CHOICES and cuts[other][1] not in endings:
                    endings.append(cuts[other][1])
        label = int(rank("label", citation), 16) % NUM_CHOICES
        endings.insert(label, endings.pop(0))
        return {
            "citation": citation,
            "book": v["book"],
            "chapter": v["chapter"],
            "verse": v["verse"],
            "prompt": f"{citation} {first}",
            "rest": rest,
            "endings": [" " + e for e in endings],
            "label": label,
        }

    picked = sorted(cuts, key=lambda c: rank("verse", c))[: NUM_TEST + NUM_TRAIN]
    by_citation = {v["citation"]: v for v in verses}
    test, train = picked[:NUM_TEST], picked[NUM_TEST:]
    return tuple(
        [doc(by_citation[c]) for c in sorted(split, key=order.__getitem__)]
        for split in (test, train)
    )


def chapter_docs(verses: list[dict]) -> list[dict]:
    """The documents of kjv_rolling: NUM_CHAPTERS chapters, in the Bible's order."""
    chapters: dict[tuple[str, int], list[str]] = {}
    for v in verses:
        chapters.setdefault((v["book"], v["chapter"]), []).append(v["text"])
    low, high = CHAPTER_VERSES
    eligible = [key for key, texts in chapters.items() if low <= len(texts) <= high]
    picked = set(sorted(eligible, key=lambda k: rank("chapter", k[0], str(k[1])))[:NUM_CHAPTERS])
    return [
        {"book": book, "chapter": chapter, "text": f"{book} {chapter}\n" + "\n".join(texts)}
        for (book, chapter), texts in chapters.items()
        if (book, chapter) in picked
    ]


def write_jsonl(path: str, docs: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")


def main(out_dir: str = HERE) -> list[str]:
    """Writes the three files into `out_dir`; returns their paths."""
    verses = read_verses()
    test, train = verse_docs(verses)
    files = {
        "verses_test.jsonl": test,
        "verses_train.jsonl": train,
        "chapters_test.jsonl": chapter_docs(verses),
    }
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, docs in files.items():
        paths.append(os.path.join(out_dir, name))
        write_jsonl(paths[-1], docs)
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default=HERE, help="where to write (default: here)")
    for written in main(parser.parse_args().out_dir):
        print(written)
