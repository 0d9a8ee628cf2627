"""`DbrxConfig`: the model's hyperparameters, our execution knobs, presets, and dtype names.

Field names are the Hugging Face ones (`d_model`, `n_heads`, `kv_n_heads`, `ffn_hidden_size`, ...),
flattened out of HF's nested `attn_config` / `ffn_config`; defaults are HF's defaults, so a partial
`config.json` means the same thing here as in `transformers` (io/hf_format.py reads and writes that
file). The last block of fields are our own knobs (dtypes, remat, kernel choices); they never go
into `config.json`. Every MoE knob starts with `moe_`, as HF's MoE fields do.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from dbrx_jax.io import hf_format

log = logging.getLogger(__name__)

DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
    "float64": jnp.float64,
}
_DTYPE_ALIASES = {
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "fp64": "float64",
    "f64": "float64",
    "double": "float64",
}
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash", "reference")  # see model/layers.py
MOE_IMPLS = ("auto", "dense", "dropless", "capacity", "gather")  # see moe/dispatch.py
GMM_IMPLS = ("auto", "ragged_dot", "tokamax", "mgpu", "megablox", "blocked")  # see moe/gmm.py
MOE_EXCHANGES = ("all_gather", "all_to_all")  # see moe/exchange.py
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "matmuls")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
# Knobs renamed since they were first written to checkpoints and run configs: old -> new.
RENAMED_FIELDS = {
    "gmm_impl": "moe_gmm_impl",
    "capacity_factor": "moe_capacity_factor",
    "router_z_loss_weight": "moe_z_loss_weight",
}


# Weights an adapter can go on (lora.py): name (module.attribute inside a block) -> (leading
# batch axes, contracted axes); the rest of a weight's axes are its outputs.
LORA_TARGETS = {
    "attn.wqkv": (0, 1),  # [D | K, J, H]
    "attn.out": (0, 2),  # [N, H | D]
    "ffn.router": (0, 1),  # [D | E]
    "ffn.w1": (1, 1),  # [E | D | F]
    "ffn.v1": (1, 1),  # [E | D | F]
    "ffn.w2": (1, 1),  # [E | F | D]
}


def lora_targets(patterns: str) -> frozenset[str]:
    """The LORA_TARGETS that `patterns` (comma-separated, fnmatch) name; each must name one."""
    chosen = set()
    for pattern in (p.strip() for p in patterns.split(",")):
        matched = fnmatch.filter(LORA_TARGETS, pattern)
        if not pattern or not matched:
            raise ValueError(
                f"DbrxConfig.lora_targets={patterns!r}: {pattern!r} matches no adaptable "
                f"weight; expected patterns over {sorted(LORA_TARGETS)}"
            )
        chosen.update(matched)
    return frozenset(chosen)


def renamed_hint(names) -> str:
    """The new names of any renamed knobs among `names`, as " (renamed: [...])"; "" if none."""
    renamed = sorted(RENAMED_FIELDS[n] for n in names if n in RENAMED_FIELDS)
    return f" (renamed: {renamed})" if renamed else ""


def dtype_name(dtype: Any) -> str:
    """The name of a float dtype however it is spelled: "bfloat16", "bf16", jnp.bfloat16,
    np.float32, jnp.dtype("float16"), "torch.float32" or torch.float32. A ValueError names the
    accepted dtypes otherwise."""
    if type(dtype).__module__ == "torch":  # a torch.dtype, without importing torch
        dtype = str(dtype)
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.").removeprefix("jnp.")
        key = key.removeprefix("np.").removeprefix("numpy.")
        name = _DTYPE_ALIASES.get(key, key)
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = repr(dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)} (or a jnp dtype)")
    return name


@dataclasses.dataclass(frozen=True, kw_only=True)
class DbrxConfig:
    """Hyperparameters of a DBRX model. Frozen and hashable, so it can sit in a jitted closure."""

    # Top level of HF's DbrxConfig.
    d_model: int = 2048
    n_heads: int = 16
    n_layers: int = 24
    max_seq_len: int = 2048
    vocab_size: int = 32000
    resid_pdrop: float = 0.0
    emb_pdrop: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    # HF's attn_config.
    attn_pdrop: float = 0.0
    clip_qkv: float | None = None
    kv_n_heads: int = 1
    rope_theta: float = 10000.0
    # HF's ffn_config.
    ffn_hidden_size: int = 3584
    ffn_act_fn: str = "silu"
    moe_num_experts: int = 4
    moe_top_k: int = 1
    moe_jitter_eps: float | None = None
    moe_loss_weight: float = 0.01
    moe_normalize_expert_weights: float | None = 1.0

    # Our knobs (not part of config.json). Which MoE path they select on which devices is
    # decided once, when a model is built for its mesh (moe/plan.py), and logged.
    dtype: str = "float32"  # activations and matmul inputs (any spelling; stored by name)
    param_dtype: str = "float32"  # stored parameters (the master copy when training)
    remat_policy: str = "none"  # one of REMAT_POLICIES, applied to each scanned block
    scan_unroll: int = 0  # blocks per layer-scan iteration; 0: auto (model/dbrx.layer_unroll_for)
    attention_impl: str = "auto"  # one of ATTENTION_IMPLS: auto is splash on TPU, else xla
    moe_impl: str = "auto"  # one of MOE_IMPLS: auto is exact (dropless; gather for a few tokens)
    moe_gmm_impl: str = "auto"  # grouped GEMM of the dropless path, one of GMM_IMPLS
    moe_capacity_factor: float = 1.0  # capacity path: slots per expert = cf * tokens * k / E
    moe_exchange: str = "all_gather"  # how tokens reach experts on other devices
    moe_fuse_gate_up: bool = False  # dropless/capacity: one [E, D, 2F] GEMM for w1 and v1
    moe_z_loss_weight: float = 0.0  # ST-MoE's router z-loss; DBRX was trained without
    # Low-rank adapters (lora.py): rank 0 is none; targets are patterns over lora.TARGETS.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "attn.*,ffn.w1,ffn.v1,ffn.w2"
    # QLoRA: the frozen base's block matrices stored at 8 or 4 bits (quant.py), dequantized per
    # layer in the step; 0 keeps them as stored. Group size 0: one scale per output channel.
    quant_bits: int = 0
    quant_group_size: int = 0

    def __post_init__(self):
        for field in ("dtype", "param_dtype"):  # jnp.bfloat16, "bf16", ... -> "bfloat16"
            try:
                object.__setattr__(self, field, dtype_name(getattr(self, field)))
            except ValueError as e:
                raise ValueError(f"DbrxConfig.{field}: {e}") from None

        def need(ok: bool, field: str, expected: str):
            if not ok:
                raise ValueError(
                    f"DbrxConfig.{field}={getattr(self, field)!r}: expected {expected}"
                )

        for field in (
            "d_model",
            "n_heads",
            "n_layers",
            "max_seq_len",
            "vocab_size",
            "kv_n_heads",
            "ffn_hidden_size",
            "moe_num_experts",
            "moe_top_k",
        ):
            need(
                isinstance(getattr(self, field), int) and getattr(self, field) > 0,
                field,
                "a positive int",
            )
        need(self.d_model % self.n_heads == 0, "d_model", f"a multiple of n_heads={self.n_heads}")
        need(
            self.n_heads % self.kv_n_heads == 0,
            "kv_n_heads",
            f"a divisor of n_heads={self.n_heads}",
        )
        need(
            self.head_dim % 2 == 0, "n_heads", "a head_dim (d_model / n_heads) that is even (RoPE)"
        )
        need(
            self.moe_top_k <= self.moe_num_experts,
            "moe_top_k",
            f"at most moe_num_experts={self.moe_num_experts}",
        )
        need(self.clip_qkv is None or self.clip_qkv > 0, "clip_qkv", "None or a positive number")
        need(self.rope_theta > 0, "rope_theta", "a positive number")
        need(
            self.moe_normalize_expert_weights is None or self.moe_normalize_expert_weights > 0,
            "moe_normalize_expert_weights",
            "None or a positive p for the p-norm",
        )
        need(
            not self.tie_word_embeddings,
            "tie_word_embeddings",
            "False (DBRX has a separate lm_head)",
        )
        need(self.ffn_act_fn in ACTIVATIONS, "ffn_act_fn", f"one of {ACTIVATIONS}")
        need(self.remat_policy in REMAT_POLICIES, "remat_policy", f"one of {REMAT_POLICIES}")
        need(
            isinstance(self.scan_unroll, int) and self.scan_unroll >= 0,
            "scan_unroll",
            "an int >= 0 (0: auto)",
        )
        need(self.attention_impl in ATTENTION_IMPLS, "attention_impl", f"one of {ATTENTION_IMPLS}")
        need(self.moe_impl in MOE_IMPLS, "moe_impl", f"one of {MOE_IMPLS}")
        need(self.moe_gmm_impl in GMM_IMPLS, "moe_gmm_impl", f"one of {GMM_IMPLS}")
        need(self.moe_capacity_factor > 0, "moe_capacity_factor", "a positive number")
        need(self.moe_exchange in MOE_EXCHANGES, "moe_exchange", f"one of {MOE_EXCHANGES}")
        need(self.moe_z_loss_weight >= 0, "moe_z_loss_weight", "a number >= 0")
        need(
            isinstance(self.lora_rank, int) and self.lora_rank >= 0,
            "lora_rank",
            "an int >= 0 (0: no adapters)",
        )
        need(self.lora_alpha > 0, "lora_alpha", "a positive number")
        need(self.quant_bits in (0, 4, 8), "quant_bits", "0 (not quantized), 8 or 4")
        need(
            not self.quant_bits or self.lora_rank > 0,
            "quant_bits",
            "0 without adapters: a quantized base is frozen, so only adapters can train "
            "(set lora_rank > 0)",
        )
        need(
            isinstance(self.quant_group_size, int) and self.quant_group_size >= 0,
            "quant_group_size",
            "an int >= 0 (0: one scale per output channel)",
        )
        if self.lora_rank:
            lora_targets(self.lora_targets)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    # Derived sizes.
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_kv_groups(self) -> int:
        """Query heads per KV head (G): query head n uses KV head n // G."""
        return self.n_heads // self.kv_n_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(DTYPES[self.dtype])

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(DTYPES[self.param_dtype])

    def replace(self, **changes: Any) -> DbrxConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(
                f"unknown DbrxConfig field(s) {sorted(unknown)}{renamed_hint(unknown)}; valid "
                f"fields: {sorted(f.name for f in dataclasses.fields(self))}"
            )
        return dataclasses.replace(self, **changes)

    def architecture(self) -> dict[str, Any]:
        """The fields that decide the parameters and what they compute: two configs that agree
        here can load each other's checkpoints."""
        names = (
            "d_model",
            "n_heads",
            "n_layers",
            "vocab_size",
            "kv_n_heads",
            "clip_qkv",
            "rope_theta",
            "ffn_hidden_size",
            "ffn_act_fn",
            "moe_num_experts",
            "moe_top_k",
            "moe_normalize_expert_weights",
            "param_dtype",
        )
        if self.lora_rank:  # adapters add parameters (absent keys: none, as before they existed)
            names += ("lora_rank", "lora_targets")
        return {name: getattr(self, name) for name in names}

    def num_params(self) -> int:
        """Total parameter count (embedding and lm_head included)."""
        d, e, f = self.d_model, self.moe_num_experts, self.ffn_hidden_size
        attn = d * (d + 2 * self.kv_n_heads * self.head_dim) + d * d
        per_layer = attn + 2 * d + d * e + 3 * e * d * f
        return self.n_layers * per_layer + 2 * self.vocab_size * d + d

    def num_active_params(self) -> int:
        """Parameters a token touches: top_k of the experts (embedding and lm_head included)."""
        inactive = (self.moe_num_experts - self.moe_top_k) * 3 * self.d_model * self.ffn_hidden_size
        return self.num_params() - self.n_layers * inactive

    # ----------------------------------------------------------------------------------------------
    # Files: the Hugging Face config.json (io/hf_format.py) and our own JSON (all fields).

    @classmethod
    def from_hf(cls, source: Mapping[str, Any] | str | os.PathLike, **overrides: Any) -> DbrxConfig:
        """Reads a transformers DBRX `config.json`: a dict, the file, or the directory holding it
        (see io/hf_format.py for how each key is read). `overrides` sets any field after reading,
        our own knobs (dtype, remat_policy, ...) too."""
        hf, where = hf_format.read_config_json(source)
        fields = hf_format.config_fields(hf, where)
        try:
            return cls(**(fields | overrides))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """The transformers `config.json` dict (our own knobs are not part of it)."""
        return hf_format.config_json(self)

    def to_json(self) -> str:
        """All fields, our knobs included (for logs and checkpoints)."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> DbrxConfig:
        """From `to_json`'s fields, also as written by earlier versions (renamed knobs are read
        under their new names)."""
        fields = dict(fields)
        for old, new in RENAMED_FIELDS.items():
            if old in fields:
                log.info("DbrxConfig: reading the old field %r as %r", old, new)
                fields[new] = fields.pop(old)
        return cls(**fields)

    @classmethod
    def from_json(cls, text: str) -> DbrxConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DbrxConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown DBRX preset {name!r}; presets: {sorted(PRESETS)}")
        return PRESETS[name].replace(**overrides)


PRESETS: dict[str, DbrxConfig] = {
    # The released databricks/dbrx-base and dbrx-instruct (config.json of the release).
    "dbrx-132b": DbrxConfig(
        d_model=6144,
        n_heads=48,
        n_layers=40,
        max_seq_len=32768,
        vocab_size=100352,
        kv_n_heads=8,
        clip_qkv=8.0,
        rope_theta=500000.0,
        ffn_hidden_size=10752,
        moe_num_experts=16,
        moe_top_k=4,
        moe_jitter_eps=0.0,
        moe_loss_weight=0.05,
        moe_normalize_expert_weights=1.0,
        pad_token_id=100277,
        bos_token_id=100257,
        eos_token_id=(100257, 100279),
        dtype="bfloat16",
        param_dtype="bfloat16",
    ),
    # The one-GPU benchmark shape (3.31B params, 0.99B active matmul params).
    "dbrx-bench": DbrxConfig(
        d_model=2048,
        n_heads=16,
        n_layers=8,
        max_seq_len=4096,
        vocab_size=100352,
        kv_n_heads=4,
        clip_qkv=8.0,
        rope_theta=500000.0,
        ffn_hidden_size=3584,
        moe_num_experts=16,
        moe_top_k=4,
        moe_jitter_eps=0.0,
        moe_loss_weight=0.05,
        dtype="bfloat16",
        param_dtype="float32",
    ),
    # CPU demo: DBRX's routing (16 experts, top-4) and GQA ratio at laptop size (~19M params).
    "dbrx-small": DbrxConfig(
        d_model=256,
        n_heads=8,
        n_layers=4,
        max_seq_len=1024,
        vocab_size=8192,
        kv_n_heads=2,
        clip_qkv=8.0,
        rope_theta=500000.0,
        ffn_hidden_size=448,
        moe_num_experts=16,
        moe_top_k=4,
        moe_jitter_eps=0.0,
        moe_loss_weight=0.05,
    ),
    # Unit tests: everything DBRX has, in a model that compiles in seconds on 2 cores.
    "dbrx-tiny": DbrxConfig(
        d_model=64,
        n_heads=4,
        n_layers=2,
        max_seq_len=256,
        vocab_size=512,
        kv_n_heads=2,
        clip_qkv=8.0,
        rope_theta=500000.0,
        ffn_hidden_size=96,
        moe_num_experts=16,
        moe_top_k=4,
        moe_jitter_eps=0.0,
        moe_loss_weight=0.05,
    ),
}
