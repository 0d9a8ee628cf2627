"""Chat data for supervised fine-tuning: the assistant mask, its trip through packing, the chat
sources and their errors, the KJV quotation set and its scoring."""

import json
import re

import grain
import numpy as np
import pytest
from absl import flags
from flax import nnx

from dbrx_jax import Dbrx, DbrxConfig, chat, data, experiment, generate, sft, tokenizer

flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    return tokenizer.load_tokenizer("dbrx")


def _conversation(i: int, turns: int = 1) -> list[dict]:
    messages = [{"role": "system", "content": f"System {i}."}] if i % 2 else []
    for j in range(turns):
        messages += [
            {"role": "user", "content": f"Question {i}.{j}: what is {i} times {j}?"},
            {"role": "assistant", "content": f"It is {i * j}, as {i} sets of {j} make" + " so" * i},
        ]
    return messages


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_mask_marks_assistant_contents_and_their_im_end(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": " Hello there \n"},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Bye"},
    ]
    ids, mask = chat.chat_ids_with_mask(tok, messages)
    assert ids == chat.chat_ids(tok, messages, add_generation_prompt=False)
    start, end, newline = tok.token_id("<|im_start|>"), tok.token_id(IM_END), tok.encode("\n")
    expected = []  # (ids, mask) built by hand from the format
    for role, content, learned in [
        ("system", "Be brief.", 0),
        ("user", "Hi", 0),
        ("assistant", "Hello there", 1),
        ("user", "Again", 0),
        ("assistant", "Bye", 1),
    ]:
        if expected:
            expected += [(i, 0) for i in newline]
        header = [start, *tok.encode(f"{role}\n")]
        expected += [(i, 0) for i in header] + [(i, learned) for i in tok.encode(content)]
        expected.append((end, learned))
    assert list(zip(ids, mask, strict=True)) == expected
    runs = re.findall(r"1+", "".join(map(str, mask)))
    masked = np.asarray(ids)[np.asarray(mask) == 1]
    assert len(runs) == 2 and tok.decode(masked) == f"Hello there{IM_END}Bye{IM_END}"


def test_default_and_no_system_turns(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    for system in (chat.DEFAULT_SYSTEM_MESSAGE, None, "Short."):
        ids, mask = chat.chat_ids_with_mask(tok, messages, system=system)
        assert ids == chat.chat_ids(tok, messages, add_generation_prompt=False, system=system)
        assert tok.decode(np.asarray(ids)[np.asarray(mask) == 1]) == f"Yo{IM_END}"


class _MergingTokenizer:
    """Characters as ids, except that a newline merges with the character after it."""

    def encode(self, text):
        return [sum(map(ord, piece)) * 7 for piece in re.findall(r"\n.|.", text, re.S)]

    def token_id(self, token):
        return {"<|im_start|>": 1, "<|im_end|>": 2}[token]


def test_a_token_straddling_header_and_content_is_content():
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Ab"}]
    ids, mask = chat.chat_ids_with_mask(_MergingTokenizer(), messages, system=None)
    assert ids[-4:] == [ord("t") * 7, (ord("\n") + ord("A")) * 7, ord("b") * 7, 2]
    assert mask[-4:] == [0, 1, 1, 1] and sum(mask) == 3


def test_model_batch_target_mask():
    tokens = np.arange(1, 6)[None]
    batch = data.model_batch(tokens, np.array([[1, 1, 2, 2, 2]]), target_mask=[[0, 1, 1, 0, 1]])
    np.testing.assert_array_equal(batch["loss_mask"], [[1, 0, 0, 1]])
    np.testing.assert_array_equal(data.model_batch(tokens)["loss_mask"], [[1, 1, 1, 1]])


def _segments(batch):
    """(row, segment id, token ids as inputs, the target after them, loss mask over the
    segment's positions) of every packed document. The last target is the document's own last
    token, or, for a document that ends before the row does, the next document's first."""
    for r in range(batch["inputs"].shape[0]):
        for s in np.unique(batch["segment_ids"][r]):
            if s == 0:
                continue
            where = np.flatnonzero(batch["segment_ids"][r] == s)
            inputs = batch["inputs"][r, where].tolist()
            yield r, s, inputs, batch["targets"][r, where[-1]], batch["loss_mask"][r, where]


def test_packed_loss_mask_counts_only_assistant_targets(tok, tmp_path):
    conversations = [_conversation(i, turns=1 + i % 3) for i in range(12)]
    path = sft.write_chat_jsonl(tmp_path / "chat.jsonl", conversations)
    docs = data.load_documents(f"chat:{path}")
    assert docs == conversations
    ds = data.make_dataset(
        docs, "dbrx", seq_len=256, batch_size=2, seed=0, eval_fraction=0, chat_system=None
    )
    batch = next(iter(ds))
    rendered = {
        tuple(chat.chat_ids(tok, c, add_generation_prompt=False, system=None)): c
        for c in conversations
    }
    rows_with_several = set()
    for r, s, inputs, last, loss_mask in _segments(batch):
        # Each segment is exactly one conversation's chat ids.
        messages = rendered.get((*inputs, last)) or rendered[tuple(inputs)]
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        # Counted independently of the mask: each answer's tokens and its <|im_end|>.
        assert loss_mask.sum() == sum(len(tok.encode(a)) + 1 for a in answers)
        where = batch["segment_ids"][r] == s
        learned = batch["targets"][r][where][loss_mask == 1]
        assert tok.decode(learned) == "".join(a + IM_END for a in answers)
        positions = batch["positions"][r][where]
        np.testing.assert_array_equal(positions, np.arange(len(positions)))
        if s > 1:
            rows_with_several.add(r)
    assert rows_with_several  # conversations share rows, each with its own mask and segment
    assert batch["loss_mask"][batch["segment_ids"] == 0].sum() == 0


def test_long_conversations_are_cut_with_their_mask(tok):
    long = [
        {"role": "user", "content": "Tell me everything."},
        {"role": "assistant", "content": "In the beginning God created the earth. " * 8},
    ]
    ids, mask = chat.chat_ids_with_mask(tok, long, system=None)
    element = {"tokens": np.asarray(ids, np.int32), "target_mask": np.asarray(mask, np.int32)}
    pieces = data.SplitLongDocuments(row_len=16).flat_map(element)
    assert len(pieces) == -(-len(ids) // 16) > 2
    for key in element:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in pieces]), element[key])
    ds = data.make_dataset([long] * 3, "dbrx", seq_len=15, batch_size=4, seed=0, eval_fraction=0)
    batch = next(iter(ds))
    assert batch["inputs"].shape == (4, 15)
    learned = batch["targets"][batch["loss_mask"] == 1]
    assert set(learned.tolist()) <= set(np.asarray(ids)[np.asarray(mask) == 1].tolist())


def test_plain_text_batches_are_unchanged(tok):
    """The text pipeline with the target mask gives the batches of the one without it."""
    docs = [
        f"Document {i}. " + "And God saw the light, that it was good. " * (i % 7) for i in range(40)
    ]
    kwargs = dict(seq_len=24, batch_size=3, seed=1)
    new = iter(data.make_dataset(docs, "dbrx", **kwargs))

    ds = grain.MapDataset.source(data.split_indices(len(docs), 0.02, "train"))
    ds = ds.map(lambda i: docs[i]).shuffle(seed=1).repeat(None)
    ds = ds.map(lambda text: {"tokens": np.asarray([*tok.encode(text), tok.eos_id], np.int32)})
    ds = grain.experimental.FlatMapIterDataset(ds.to_iter_dataset(), data.SplitLongDocuments(25))
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={"tokens": 25}, num_packing_bins=12, seed=1, shuffle_bins=True
    )
    old = iter(ds.batch(3, drop_remainder=True))
    for _ in range(5):
        packed, batch = next(old), next(new)
        expected = data.model_batch(
            packed["tokens"], packed["tokens_segment_ids"], packed["tokens_positions"]
        )
        assert set(batch) == set(expected)
        for key, value in expected.items():
            np.testing.assert_array_equal(batch[key], value, err_msg=key)
            assert batch[key].dtype == value.dtype


@pytest.mark.parametrize(
    "line, error",
    [
        ('{"messages": [', r"bad.jsonl:3: not valid JSON"),
        ('{"text": "hi"}', r'bad.jsonl:3: expected a JSON object with a non-empty "messages"'),
        ('{"messages": []}', r'bad.jsonl:3: expected a JSON object with a non-empty "messages"'),
        ('{"messages": ["hi"]}', r'bad.jsonl:3: messages\[0\]: expected an object with "role"'),
        (
            '{"messages": [{"role": "tool", "content": "x"}]}',
            r"bad.jsonl:3: messages\[0\]: role 'tool', expected system, user or assistant",
        ),
        (
            '{"messages": [{"role": "assistant", "content": 3}]}',
            r'bad.jsonl:3: messages\[0\]: expected a string "content"',
        ),
        (
            '{"messages": [{"role": "user", "content": "Hi"}]}',
            r"bad.jsonl:3: no assistant message",
        ),
    ],
)
def test_bad_chat_lines_name_file_and_line(tmp_path, line, error):
    good = json.dumps({"messages": _conversation(1)})
    path = _write_lines(tmp_path / "bad.jsonl", [good, "", line])  # a blank line counts
    with pytest.raises(ValueError, match=error) as info:
        data.load_documents(f"chat:{path}")
    assert "\n" not in str(info.value)


def test_a_tokenizer_without_the_markers_encodes_them_as_text(tmp_path):
    spm = tokenizer.train_sentencepiece(["a plain text corpus"] * 50, tmp_path / "t.model", 300)
    assert not chat.has_markers(spm)
    conversation = _conversation(1)
    ids, mask = chat.chat_ids_with_mask(spm, conversation)
    # sentencepiece spells newlines as spaces and starts each encoded piece with one
    rendered = chat.render_chat(conversation, add_generation_prompt=False)
    assert spm.decode(ids).split() == rendered.replace("<|", " <|").replace("|>", "|> ").split()
    # the mask: the assistant's content and its closing marker's text
    end = spm.encode("<|im_end|>")
    assert ids[-len(end) :] == end and all(mask[-len(end) :])
    learned = spm.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert learned.split() == (conversation[-1]["content"] + " <|im_end|>").split()
    batch = next(
        iter(data.make_dataset([conversation] * 4, spm.path, seq_len=64, batch_size=1, seed=0))
    )
    assert batch["loss_mask"].sum() > 0


def _reference(conversation):
    return re.search(r"[A-Z][a-z]+ \d+:\d+", conversation[-2]["content"]).group()


def test_kjv_chat_split_is_held_out_and_stable():
    train, held = sft.kjv_chat("train"), sft.kjv_chat("eval")
    train_refs, held_refs = set(map(_reference, train)), set(map(_reference, held))
    assert len(train_refs) == len(train) and len(held_refs) == len(held)
    assert not train_refs & held_refs and len(train_refs | held_refs) == 267  # Genesis 1-10
    assert 0.05 < len(held_refs) / 267 < 0.2
    assert train[0][0] == {"role": "system", "content": sft.KJV_SYSTEM}
    (verse,) = [c for c in train + held if _reference(c) == "Genesis 1:3"]
    assert verse[1]["content"] in [q.format(ref="Genesis 1:3") for q in sft.KJV_QUESTIONS]
    assert verse[2] == {
        "role": "assistant",
        "content": "And God said, Let there be light: and there was light.",
    }
    # A reference's split does not depend on the books chosen.
    wider = set(map(_reference, sft.kjv_chat("eval", books=("Genesis", "Ruth"), chapters=None)))
    assert held_refs <= wider and any(r.startswith("Ruth") for r in wider)
    assert not set(map(_reference, sft.kjv_chat("train", chapters=None))) & wider
    assert data.load_documents("kjv_chat") == train
    with pytest.raises(ValueError, match="no book named 'Genesys'"):
        sft.kjv_chat(books=("Genesys",))


def test_kjv_chat_file_and_batches(tok, tmp_path):
    train = sft.kjv_chat("train", chapters=2)
    path = sft.write_chat_jsonl(tmp_path / "kjv_chat.jsonl", train)
    first = json.loads(open(path).readline())
    assert first == {"messages": train[0]}
    assert data.load_documents(f"chat:{path}") == train
    ds = data.make_dataset(train, "dbrx", seq_len=128, batch_size=2, seed=0)
    batch = next(iter(ds))
    learned = tok.decode(batch["targets"][0][batch["loss_mask"][0] == 1])
    assert learned.endswith(IM_END) and "Quote" not in learned and "King James" not in learned


def _examples():
    return [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "kitten"}],
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": " sitting\n"},
        ],
    ]


def test_score_references_with_fake_replies():
    seen = []

    def echo(prompts):
        seen.extend(prompts)
        return ["kitten", "sitting"]

    assert sft.score_references(echo, _examples()) == {
        "count": 2,
        "exact_match": 1.0,
        "char_accuracy": 1.0,
    }
    assert seen == [_examples()[0][:1], _examples()[1][:2]]  # the prompts stop before the answer
    scores = sft.score_references(lambda p: ["sitting ", ""], _examples())
    assert scores["exact_match"] == 0.0
    assert scores["char_accuracy"] == pytest.approx((1 - 3 / 7 + 0) / 2)  # kitten -> sitting: 3
    assert sft.levenshtein("flaw", "lawn") == 2 and sft.char_accuracy("", "") == 1.0
    with pytest.raises(ValueError, match="gave 1 replies for 2 prompts"):
        sft.score_references(lambda p: ["x"], _examples())


def test_chat_replies_are_cut_at_the_end_marker_and_scored(tmp_path):
    """A tiny model's greedy replies through generate.chat_replies: one string per prompt, nothing
    after <|im_end|> (as text, for a tokenizer without the marker), scored."""
    spm = tokenizer.train_sentencepiece(
        [sft.KJV_SYSTEM, "Quote Genesis 1:1.", "In the beginning"] * 30, tmp_path / "t.model", 300
    )
    model = Dbrx(DbrxConfig.preset("dbrx-tiny", vocab_size=spm.vocab_size), rngs=nnx.Rngs(0))
    examples = sft.kjv_chat("eval")[:3]
    replies = generate.chat_replies(model, spm, max_new_tokens=8)([m[:-1] for m in examples])
    assert len(replies) == 3 and all("<|im_end|>" not in r for r in replies)
    score = sft.score_references(generate.chat_replies(model, spm, max_new_tokens=8), examples)
    assert score["count"] == 3 and 0 <= score["char_accuracy"] < 1


def test_scoring_references_needs_the_kjv_chat_source():
    config = experiment.base_config()
    config.score_references = 4
    with pytest.raises(ValueError, match="score_references=4: expected 0 unless data.source"):
        experiment.validate(config)
