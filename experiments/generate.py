"""Generate text (or token ids) from a checkpoint: our export, an HF directory, or the params of
a converted model; streams to the console as the tokens come.

    python experiments/generate.py --checkpoint=runs/demo-export --prompt="And God said"
    python experiments/generate.py --checkpoint=dbrx-instruct --chat --prompt="Hi!" \
        --temperature=0.7 --top_p=0.9 --mesh=tensor=8
    python experiments/generate.py --checkpoint=ckpt --prompt_ids="1,2,3;4,5" \
        --output_json=out.json
    python experiments/generate.py --checkpoint=runs/demo-export --adapters=runs/sft --chat \
        --prompt="Quote Genesis 1:3."
"""

import json
import sys

import jax
from absl import app, flags

from dbrx_jax import chat, cli, sharding, state
from dbrx_jax import generate as gen

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Our export or an HF directory.", required=True
)
_ADAPTERS = flags.DEFINE_string(
    "adapters", None, "A LoRA run's workdir: its adapters on --checkpoint as the base."
)
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Prompt text (repeat for a batch).")
_PROMPT_IDS = flags.DEFINE_multi_string("prompt_ids", [], "Token ids 1,2,3 (';' or repeat).")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap each prompt as a user turn (DBRX-instruct).")
_SYSTEM = flags.DEFINE_string(
    "system", None, "With --chat: the system message (default: DBRX-instruct's)."
)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "dbrx, hf:<dir>, or a sentencepiece file.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0: off.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "1.0: off.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_MESH = flags.DEFINE_string("mesh", None, "Serve sharded, e.g. tensor=8 or expert=4,tensor=2.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write the generated ids here.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # What needs no model is checked before loading one (the rest: generate.check_request).
    prompts = [_ids(group) for flag in _PROMPT_IDS.value for group in flag.split(";") if group]
    sampling = gen.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    mesh = sharding.make_mesh(sharding.parse_mesh(_MESH.value)) if _MESH.value else None
    model, tok = state.load_for_inference(
        _CHECKPOINT.value, _ADAPTERS.value or "", _TOKENIZER.value or "", mesh
    )
    for text in _PROMPT.value:
        if tok is None:
            raise app.UsageError(
                "no tokenizer for this checkpoint: pass --tokenizer or --prompt_ids"
            )
        prompts.append(chat.chat_ids(tok, _messages(text)) if _CHAT.value else tok.encode(text))
    if not prompts:
        raise app.UsageError("pass --prompt or --prompt_ids")
    stream = tok is not None and len(prompts) == 1 and not _OUTPUT_JSON.value
    out = gen.generate(
        model,
        prompts,
        max_new_tokens=_MAX_NEW.value,
        key=jax.random.key(_SEED.value),
        sampling=sampling,
        stop_ids=_stop_ids(tok),
        vocab_limit=tok.vocab_size if tok is not None else None,
        pad_id=getattr(tok, "pad_id", 0),
        on_token=gen.text_streamer(tok, _write) if stream else None,
    )
    ids = [
        row[:n].tolist()
        for row, n in zip(jax.device_get(out.tokens_BX), jax.device_get(out.lengths_B), strict=True)
    ]
    if stream:
        print()
    elif tok is not None:
        for prompt, new in zip(prompts, ids, strict=True):
            print(repr(tok.decode(prompt)), "->", repr(tok.decode(new)))
    if _OUTPUT_JSON.value:
        with open(_OUTPUT_JSON.value, "w") as f:
            json.dump({"prompts": prompts, "generated": ids}, f)


def _messages(text: str) -> list[dict]:
    system = [{"role": "system", "content": _SYSTEM.value}] if _SYSTEM.value else []
    return [*system, {"role": "user", "content": text}]


def _stop_ids(tok) -> tuple[int, ...]:
    """The tokenizer's end of text, and with --chat its end of turn (where it has one)."""
    if tok is None:
        return ()
    end = [tok.token_id("<|im_end|>")] if _CHAT.value and chat.has_markers(tok) else []
    return (*tok.stop_ids, *end)


def _ids(group: str) -> list[int]:
    try:
        return [int(i) for i in group.split(",")]
    except ValueError:
        raise app.UsageError(
            f"--prompt_ids={group!r}: expected comma-separated ints, e.g. 1,2,3 (';' between "
            "prompts)"
        ) from None


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


if __name__ == "__main__":
    cli.run(main)
