"""Train a sentencepiece tokenizer on an experiment's training documents (or any source).

    python experiments/train_tokenizer.py --config=configs/demo.py --workdir=runs/demo
        # -> runs/demo/spm_4096.model, where experiments/train.py looks for it
    python experiments/train_tokenizer.py --source='text:corpus/*.txt' --vocab_size=8000 \
        --output=tok.model
"""

import pathlib

from absl import app, flags
from ml_collections import config_flags

from dbrx_jax import cli, data, tokenizer

DEMO = pathlib.Path(__file__).resolve().parent.parent / "configs" / "demo.py"
_CONFIG = config_flags.DEFINE_config_file("config", str(DEMO), "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Cache the tokenizer where train.py finds it.")
_SOURCE = flags.DEFINE_string("source", None, "A data source instead of the config's.")
_VOCAB = flags.DEFINE_integer("vocab_size", None, "Vocabulary size instead of the config's.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the .model here instead.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    data_config = _CONFIG.value.data
    documents = data.load_documents(_SOURCE.value or data_config.source, data_config.text_key)
    if _OUTPUT.value:
        indices = data.split_indices(len(documents), data_config.eval_fraction, "train")
        tok = tokenizer.train_sentencepiece(
            (documents[i] for i in indices),
            _OUTPUT.value,
            _VOCAB.value or data_config.spm_vocab_size,
        )
        path = tok.path
    else:
        if not _WORKDIR.value:
            raise app.UsageError("pass --workdir (or --output)")
        if _VOCAB.value:
            data_config.spm_vocab_size = _VOCAB.value
        path = data.prepare_tokenizer(data_config, documents, _WORKDIR.value)
    print(f"tokenizer: {path} ({tokenizer.load_tokenizer(path).vocab_size} pieces)")


if __name__ == "__main__":
    cli.run(main)
