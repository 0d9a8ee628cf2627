"""Data sources, tokenizers and the grain pipeline."""

import json

import numpy as np
import pytest
from absl import flags

from dbrx_jax import data, tokenizer

flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    docs = data.load_documents("kjv")
    path = tmp_path_factory.mktemp("spm") / "kjv.model"
    return tokenizer.train_sentencepiece(docs[:200], path, 512)


def test_kjv_corpus_is_the_bible():
    docs = data.load_documents("kjv")
    assert len(docs) == 1189  # chapters
    assert docs[0].startswith("Genesis 1\nIn the beginning God created the heaven and the earth.")
    assert 4_000_000 < sum(map(len, docs)) < 4_500_000


def test_sentencepiece_round_trip(spm):
    text = "And God said, Let there be light: and there was light."
    assert spm.decode(spm.encode(text)) == text
    assert spm.vocab_size == 512 and spm.eos_id == 3 and spm.pad_id == 0


def test_dbrx_tokenizer_ids():
    tok = tokenizer.DbrxTokenizer()
    assert tok.encode("hello world") == [15339, 1917]  # cl100k_base
    assert tok.encode("<|im_start|>user", allow_special=True)[0] == 100278
    assert tok.encode("<|im_start|>") != [100278]  # plain text unless allowed
    assert tok.token_id("<|im_end|>") == 100279 and tok.token_id("<|pad|>") == 100277
    assert tok.eos_id == 100257 and tok.vocab_size == 100280
    assert tok.decode([15339, 1917, 100279]) == "hello world<|im_end|>"


def test_text_and_jsonl_sources_and_their_errors(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.txt").write_text("second document")
    assert data.load_documents(f"text:{tmp_path}/*.txt") == ["first document", "second document"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"text": "y"}))
    assert data.load_documents(f"jsonl:{tmp_path}/c.jsonl") == ["x", "y"]
    with pytest.raises(FileNotFoundError, match="no files match"):
        data.load_documents(f"text:{tmp_path}/missing/*.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt: empty file"):
        data.load_documents(f"text:{tmp_path}/empty.txt")
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe nope")
    with pytest.raises(ValueError, match="bad.txt: invalid UTF-8 at byte 3"):
        data.load_documents(f"text:{tmp_path}/bad.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    with pytest.raises(
        ValueError,
        match=r"bad.jsonl:2: expected a JSON object with a string "
        r"field 'text'",
    ):
        data.load_documents(f"jsonl:{tmp_path}/bad.jsonl")
    with pytest.raises(ValueError, match="data.source='parquet:x'"):
        data.load_documents("parquet:x")


def test_arrayrecord_source(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = str(tmp_path / "docs.arrayrecord")
    writer = ArrayRecordWriter(path, "group_size:1")
    writer.write(b"plain text document")
    writer.write(json.dumps({"text": "json document"}).encode())
    writer.close()
    docs = data.load_documents(f"arrayrecord:{path}")
    assert list(docs) == ["plain text document", "json document"]


def test_pipeline_batches(spm):
    docs = data.load_documents("kjv")
    ds = data.make_dataset(docs, spm.path, seq_len=32, batch_size=4, seed=0)
    it = iter(ds)
    batches = [next(it) for _ in range(3)]
    b = batches[0]
    assert set(b) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    assert all(v.shape == (4, 32) for v in b.values())
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    np.testing.assert_array_equal(b["positions"], data.positions_from_segments(b["segment_ids"]))
    # Determinism from the seed, and a different order from another seed.
    again = next(iter(data.make_dataset(docs, spm.path, seq_len=32, batch_size=4, seed=0)))
    np.testing.assert_array_equal(again["inputs"], b["inputs"])
    other = next(iter(data.make_dataset(docs, spm.path, seq_len=32, batch_size=4, seed=1)))
    assert not np.array_equal(other["inputs"], b["inputs"])


def test_long_documents_are_cut_into_rows(spm):
    """The documented handling: a document longer than a row becomes row-sized pieces, in
    order, each packed as a document of its own."""
    long_doc = " ".join(["In the beginning God created the heaven and the earth."] * 20)
    ids = np.asarray([*spm.encode(long_doc), spm.eos_id], np.int32)
    pieces = data.SplitLongDocuments(row_len=16).flat_map({"tokens": ids})
    assert all(len(p["tokens"]) <= 16 for p in pieces) and len(pieces) == -(-len(ids) // 16)
    np.testing.assert_array_equal(np.concatenate([p["tokens"] for p in pieces]), ids)
    ds = data.make_dataset([long_doc] * 4, spm.path, seq_len=15, batch_size=2, seed=0)
    batch = next(iter(ds))
    assert batch["inputs"].shape == (2, 15)
    np.testing.assert_array_equal(batch["positions"][batch["segment_ids"] == 1][:15], np.arange(15))


def test_splits_and_process_shards_are_disjoint():
    train = data.split_indices(100, 0.1, "train")
    held_out = data.split_indices(100, 0.1, "eval")
    assert len(held_out) == 10 and not set(train) & set(held_out)
    assert sorted(train + held_out) == list(range(100))
    shards = [train[i::2] for i in range(2)]
    assert not set(shards[0]) & set(shards[1])


def test_grain_worker_processes(spm):
    docs = data.load_documents("kjv")[:50]
    ds = data.make_dataset(docs, spm.path, seq_len=32, batch_size=2, seed=0, worker_count=1)
    batch = next(iter(ds))
    assert batch["inputs"].shape == (2, 32)
