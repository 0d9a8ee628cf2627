"""DBRX's tokenizer as HF files (io/hf_tokenizer.py): tokenizer.json encodes and
decodes as tiktoken does, transformers' AutoTokenizer loads it with DBRX's special tokens and a
chat template that renders as chat.render_chat, and jax_to_hf writes it for a DBRX-sized
vocabulary that comes without tokenizer files."""

import json
import logging
import shutil

import jinja2
import pytest
import tokenizers
import transformers
from flax import nnx

from dbrx_jax import DbrxConfig, chat, sft
from dbrx_jax.io import checkpoint, convert
from dbrx_jax.io.hf_tokenizer import write_hf_tokenizer
from dbrx_jax.model import Dbrx
from dbrx_jax.tokenizer import DBRX_SPECIAL_TOKENS, DbrxTokenizer

TEXTS = [
    "Hello, world!",
    "Hello , world . ( spaces before punctuation ) ?",  # decoding must not "clean them up"
    "   leading spaces",
    "trailing spaces   ",
    "   ",
    " ",
    "\n",
    "a\r\nb\r\n\r\n",
    "I'll say it's John's, you've, they're, we'd. WE'LL, IT'S, I'M 's 'll 've",
    "1234567890123456789 and 3.14159265358979, 1,000,000 or 0x7fffffff; 12 345 6789",
    "٣٤٥٦ ²³ Ⅻ 一二三",
    "café naïve résumé Ångström, e\u0301 (combining), straße, İstanbul",
    "日本語のテキスト、中文，한국어 Привет мир Ωμέγα",
    "emoji 😀👍🏽🇺🇸👨\u200d👩\u200d👧 done",
    "\u00a0nbsp\u2009thin\u3000ideographic\ufeffbom\u200bzwsp",
    "def f(x):\n\tif x:\n\t\treturn [i ** 2 for i in range(10)]\n        pass\n\n\n    \n}",
    'int main() {\n    printf("%d\\n", 42);\n  \t  return 0;\n}\n',
    "    \t  \n\n  x\n\t\t\ty  \n",
    "<|im_start",
    "<|",
    "|>",
    "",
]
CONVERSATIONS = {
    "no_system": [{"role": "user", "content": "What is 2+2?"}],
    "system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Red."},
    ],
    "whitespace": [
        {"role": "system", "content": "\n  Be brief.  \n"},
        {"role": "user", "content": "  spaced out\t\n"},
        {"role": "assistant", "content": "\n\nok \n"},
        {"role": "user", "content": " again "},
    ],
    "late_system": [
        {"role": "user", "content": "x"},
        {"role": "system", "content": "a system turn that is not the first"},
    ],
}


def _kjv_verses(every: int = 100) -> list[str]:
    with open(sft.kjv_path()) as f:
        return [json.loads(line)["text"] for i, line in enumerate(f) if i % every == 0]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dbrx_tokenizer")
    written = write_hf_tokenizer(directory, chat_template=chat.chat_template())
    assert sorted(written) == sorted(p.name for p in directory.iterdir())
    return directory


@pytest.fixture(scope="module")
def reference():
    return DbrxTokenizer()  # tiktoken


@pytest.fixture(scope="module")
def auto(hf_dir):
    return transformers.AutoTokenizer.from_pretrained(hf_dir)


def test_tokenizer_json_encodes_and_decodes_as_tiktoken(hf_dir, reference):
    texts = [*TEXTS, *_kjv_verses(), "\n".join(_kjv_verses(997))]
    assert len(texts) > 300
    backend = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    ours = DbrxTokenizer(hf_dir)
    for text in texts:
        expected = reference.encode(text)
        ids = backend.encode(text, add_special_tokens=False).ids
        assert ids == expected, text
        assert backend.encode(text).ids == expected, text  # nothing added by default either
        assert ours.encode(text) == expected, text
        assert backend.decode(ids) == text
        assert ours.decode(ids) == text


def test_special_tokens_keep_dbrx_ids_and_the_gaps(hf_dir, reference):
    backend = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for token, id_ in DBRX_SPECIAL_TOKENS.items():
        assert backend.token_to_id(token) == id_
        assert backend.id_to_token(id_) == token
    for unused in [100256, *range(100261, 100276), 100280]:
        assert backend.id_to_token(unused) is None
    text = "<|im_start|>user\nHi<|im_end|><|endoftext|><|pad|>"
    ids = backend.encode(text).ids
    assert ids == reference.encode(text, allow_special=True)
    assert backend.decode(ids, skip_special_tokens=False) == text
    assert backend.decode(ids, skip_special_tokens=True) == "user\nHi"


def test_transformers_loads_it_with_dbrx_special_tokens(auto, reference):
    assert (auto.bos_token_id, auto.eos_token_id, auto.unk_token_id) == (100257,) * 3
    assert auto.pad_token_id == 100277
    for text in TEXTS + _kjv_verses(1000):
        ids = auto(text)["input_ids"]  # add_special_tokens=True by default: still no BOS
        assert ids == reference.encode(text), text
        assert auto.decode(ids) == text
    ids = auto("<|im_start|>user\nHello<|im_end|>")["input_ids"]
    assert ids == [100278, 882, 198, 9906, 100279]
    assert auto.decode(ids) == "<|im_start|>user\nHello<|im_end|>"
    assert auto.decode(ids, skip_special_tokens=True) == "user\nHello"
    assert auto.convert_tokens_to_ids(["<|im_end|>", "<|endofprompt|>"]) == [100279, 100276]


@pytest.mark.parametrize("generation_prompt", [True, False], ids=["prompt", "no_prompt"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_renders_as_render_chat(auto, reference, name, generation_prompt):
    messages = CONVERSATIONS[name]
    text = auto.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    assert text == chat.render_chat(messages, add_generation_prompt=generation_prompt)
    ids = auto.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, return_dict=True
    )["input_ids"]
    assert ids == chat.chat_ids(reference, messages, add_generation_prompt=generation_prompt)


def test_chat_template_refuses_unknown_roles_as_render_chat_does(auto):
    messages = [{"role": "tool", "content": "x"}]
    with pytest.raises(ValueError, match="chat role 'tool'"):
        chat.render_chat(messages)
    with pytest.raises(jinja2.TemplateError, match="chat role 'tool'"):
        auto.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize(
    "system",
    [None, "Say \"hi\" \\ {{ not jinja }} {% raw %} 'quoted' — 😀\n\ttabbed  "],
    ids=["none", "escapes"],
)
def test_chat_template_with_another_system_message(tmp_path, system):
    write_hf_tokenizer(tmp_path, chat_template=chat.chat_template(system))
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for messages in CONVERSATIONS.values():
        text = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == chat.render_chat(messages, system=system)


def test_write_refuses_a_file_as_the_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'file'}: not a directory"):
        write_hf_tokenizer(tmp_path / "file", chat_template=None)


def _export(directory, vocab_size):
    config = DbrxConfig.preset(
        "dbrx-tiny", vocab_size=vocab_size, n_layers=1, param_dtype="bfloat16"
    )
    model = Dbrx(config, rngs=nnx.Rngs(0))
    checkpoint.export_params(nnx.state(model, nnx.Param), config, str(directory))
    return directory


def test_jax_to_hf_writes_dbrx_tokenizer_files_for_a_dbrx_vocabulary(tmp_path, reference, caplog):
    export = _export(tmp_path / "export", 100352)
    with caplog.at_level(logging.INFO, logger=convert.__name__):
        convert.jax_to_hf(str(export), str(tmp_path / "hf"), progress=False)
    assert "has no tokenizer files; wrote DBRX's tokenizer" in caplog.text
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")  # beside config.json
    assert auto("Hello 12345 world")["input_ids"] == reference.encode("Hello 12345 world")
    messages = CONVERSATIONS["multi_turn"]
    text = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == chat.render_chat(messages)  # (whose add_generation_prompt defaults to True)
    # Tokenizer files the export carries are copied instead, as they are.
    shutil.copytree(export, tmp_path / "carrying")
    (tmp_path / "carrying" / "tokenizer.json").write_text("{}")
    convert.jax_to_hf(str(tmp_path / "carrying"), str(tmp_path / "hf2"), progress=False)
    assert (tmp_path / "hf2" / "tokenizer.json").read_text() == "{}"
    assert not (tmp_path / "hf2" / "tokenizer_config.json").exists()


def test_jax_to_hf_writes_no_tokenizer_for_another_vocabulary(tmp_path):
    export = _export(tmp_path / "export", 128)
    convert.jax_to_hf(str(export), str(tmp_path / "hf"), progress=False)
    assert not any((tmp_path / "hf" / name).exists() for name in convert.TOKENIZER_FILES)


def test_ids_without_a_token_decode_to_nothing(hf_dir):
    """A model can emit cl100k's unused ids and the embedding's padding rows; both tokenizers
    skip them, as transformers' does."""
    hello = DbrxTokenizer().encode("Hello")
    for ids in ([100256, *hello, 100261], [*hello, 100275, 100300]):
        assert DbrxTokenizer().decode(ids) == "Hello"
        assert DbrxTokenizer(hf_dir).decode(ids) == "Hello"
