"""`DbrxConfig`: the model's hyperparameters, the Hugging Face `config.json` format, and presets.

Field names are the Hugging Face ones (`d_model`, `n_heads`, `kv_n_heads`, `ffn_hidden_size`, ...),
flattened out of HF's nested `attn_config` / `ffn_config`; defaults are HF's defaults, so a partial
`config.json` means the same thing here as in `transformers`. The last block of fields are our own
knobs (dtypes, remat, kernel choices); they never go into `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
    "float64": jnp.float64,
}
ATTENTION_IMPLS = ("xla", "cudnn", "reference")
MOE_IMPLS = ("auto", "dense", "dropless", "capacity", "gather")  # see moe_dispatch.py
GMM_IMPLS = ("auto", "ragged_dot", "tokamax", "mgpu", "megablox", "blocked")  # see gmm.py
MOE_EXCHANGES = ("all_gather", "all_to_all")  # see moe_parallel.py
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "matmuls")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")

# Hugging Face `ffn_act_fn` names -> ours.
_HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}


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

    # Our knobs (not part of config.json).
    dtype: str = "float32"  # activations and matmul inputs
    param_dtype: str = "float32"  # stored parameters (the master copy when training)
    remat_policy: str = "none"  # one of REMAT_POLICIES, applied to each scanned block
    attention_impl: str = "xla"  # one of ATTENTION_IMPLS
    moe_impl: str = "auto"  # one of MOE_IMPLS: auto is exact (dropless; gather when decoding)
    gmm_impl: str = "auto"  # grouped GEMM of the dropless path, one of GMM_IMPLS
    capacity_factor: float = 1.0  # of the capacity path: slots per expert = cf * T * k / E
    moe_exchange: str = "all_gather"  # how tokens reach experts on other devices
    moe_fuse_gate_up: bool = False  # dropless/capacity: one [E, D, 2F] GEMM for w1 and v1
    router_z_loss_weight: float = 0.0  # ST-MoE's z-loss; DBRX was trained without

    def __post_init__(self):
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
        need(self.dtype in DTYPES, "dtype", f"one of {tuple(DTYPES)}")
        need(self.param_dtype in DTYPES, "param_dtype", f"one of {tuple(DTYPES)}")
        need(self.remat_policy in REMAT_POLICIES, "remat_policy", f"one of {REMAT_POLICIES}")
        need(self.attention_impl in ATTENTION_IMPLS, "attention_impl", f"one of {ATTENTION_IMPLS}")
        need(self.moe_impl in MOE_IMPLS, "moe_impl", f"one of {MOE_IMPLS}")
        need(self.gmm_impl in GMM_IMPLS, "gmm_impl", f"one of {GMM_IMPLS}")
        need(self.capacity_factor > 0, "capacity_factor", "a positive number")
        need(self.moe_exchange in MOE_EXCHANGES, "moe_exchange", f"one of {MOE_EXCHANGES}")
        need(self.router_z_loss_weight >= 0, "router_z_loss_weight", "a number >= 0")
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
                f"unknown DbrxConfig field(s) {sorted(unknown)}; valid fields: "
                f"{sorted(f.name for f in dataclasses.fields(self))}"
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
    # The Hugging Face config.json format.

    @classmethod
    def from_hf(cls, source: Mapping[str, Any] | str | os.PathLike, **overrides: Any) -> DbrxConfig:
        """Reads a transformers DBRX `config.json`: a dict, the file, or the directory holding it.

        Both forms of the RoPE base are understood: the original `attn_config.rope_theta` and the
        transformers-v5 `rope_parameters = {"rope_type": "default", "rope_theta": ...}`.
        `overrides` sets any field after reading, our own knobs (dtype, remat_policy, ...) too.
        """
        hf, where = read_hf_config(source)
        model_type = hf.get("model_type")
        architectures = hf.get("architectures") or []
        if model_type not in (None, "dbrx") or (
            architectures and not any(a.startswith("Dbrx") for a in architectures)
        ):
            raise ValueError(
                f"{where}: not a DBRX config (model_type={model_type!r}, "
                f"architectures={architectures!r}); expected model_type 'dbrx'"
            )
        attn = dict(hf.get("attn_config") or {})
        ffn = dict(hf.get("ffn_config") or {})
        for name, sub in (("attn_config", attn), ("ffn_config", ffn)):
            if not isinstance(sub, dict):
                raise ValueError(f"{where}: {name} must be a JSON object, got {sub!r}")

        fields: dict[str, Any] = {}
        for key in (
            "d_model",
            "n_heads",
            "n_layers",
            "max_seq_len",
            "vocab_size",
            "resid_pdrop",
            "emb_pdrop",
            "initializer_range",
            "tie_word_embeddings",
            "pad_token_id",
            "bos_token_id",
            "eos_token_id",
        ):
            if hf.get(key) is not None:
                fields[key] = hf[key]
        for key in ("attn_pdrop", "clip_qkv", "kv_n_heads"):
            if key in attn:
                fields[key] = attn[key]
        for key in (
            "ffn_hidden_size",
            "moe_num_experts",
            "moe_top_k",
            "moe_jitter_eps",
            "moe_loss_weight",
            "moe_normalize_expert_weights",
        ):
            if key in ffn:
                fields[key] = ffn[key]
        act = ffn.get("ffn_act_fn") or {"name": "silu"}
        act_name = act.get("name") if isinstance(act, dict) else act
        if act_name not in _HF_ACTIVATIONS:
            raise ValueError(
                f"{where}: ffn_config.ffn_act_fn={act!r} is not supported; expected "
                f"one of {sorted(_HF_ACTIVATIONS)}"
            )
        fields["ffn_act_fn"] = _HF_ACTIVATIONS[act_name]
        theta = _rope_theta(hf, attn, where)
        if theta is not None:
            fields["rope_theta"] = theta
        for key in (
            "clip_qkv",
            "rope_theta",
            "moe_jitter_eps",
            "moe_loss_weight",
            "moe_normalize_expert_weights",
            "resid_pdrop",
            "emb_pdrop",
            "attn_pdrop",
            "initializer_range",
        ):
            if fields.get(key) is not None:
                fields[key] = float(fields[key])
        if isinstance(fields.get("eos_token_id"), list):
            fields["eos_token_id"] = tuple(fields["eos_token_id"])
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """The transformers `config.json` dict. RoPE's base is written in both the original and the
        v5 places, so every transformers release reads the same value."""
        out: dict[str, Any] = {
            "architectures": ["DbrxForCausalLM"],
            "model_type": "dbrx",
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "n_layers": self.n_layers,
            "max_seq_len": self.max_seq_len,
            "vocab_size": self.vocab_size,
            "resid_pdrop": self.resid_pdrop,
            "emb_pdrop": self.emb_pdrop,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": False,
            "use_cache": True,
            "output_router_logits": False,
            "attn_config": {
                "attn_pdrop": self.attn_pdrop,
                "clip_qkv": self.clip_qkv,
                "kv_n_heads": self.kv_n_heads,
                "rope_theta": self.rope_theta,
            },
            "ffn_config": {
                "ffn_act_fn": {"name": _to_hf_activation(self.ffn_act_fn)},
                "ffn_hidden_size": self.ffn_hidden_size,
                "moe_num_experts": self.moe_num_experts,
                "moe_top_k": self.moe_top_k,
                "moe_jitter_eps": self.moe_jitter_eps,
                "moe_loss_weight": self.moe_loss_weight,
                "moe_normalize_expert_weights": self.moe_normalize_expert_weights,
            },
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "dtype": self.param_dtype,
        }
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, key)
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        """All fields, our knobs included (for logs and checkpoints)."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DbrxConfig:
        return cls(**json.loads(text))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DbrxConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown DBRX preset {name!r}; presets: {sorted(PRESETS)}")
        return PRESETS[name].replace(**overrides)


def read_hf_config(source: Mapping[str, Any] | str | os.PathLike) -> tuple[dict[str, Any], str]:
    """The raw config.json dict and where it came from (for error messages)."""
    if isinstance(source, Mapping):
        return dict(source), "config dict"
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such config.json")
    with open(path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return hf, path


def _rope_theta(hf: dict, attn: dict, where: str) -> float | None:
    """The RoPE base from either place. transformers v5 runs with `rope_parameters` and ignores
    `attn_config.rope_theta` (so a legacy config loaded and re-saved by it can carry both, with
    different values); two different values are refused rather than guessed between."""
    params = hf.get("rope_parameters") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"{where}: rope_parameters.rope_type={rope_type!r} is not supported; "
            "DBRX uses plain RoPE ('default')"
        )
    v5 = params.get("rope_theta", hf.get("rope_theta"))
    legacy = attn.get("rope_theta")
    if v5 is not None and legacy is not None and float(v5) != float(legacy):
        raise ValueError(
            f"{where}: rope_parameters.rope_theta={v5} and attn_config.rope_theta={legacy} "
            "disagree (transformers >= 5 uses the first, the original DBRX code the second; "
            "the released DBRX uses 500000). Make them equal."
        )
    return v5 if v5 is not None else legacy


def _to_hf_activation(name: str) -> str:
    return {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}[name]


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
