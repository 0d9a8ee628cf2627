"""The Hugging Face DBRX format, in one place: `config.json` and `generation_config.json` both
ways, and the name, shape and layout of every checkpoint tensor.

This module knows files, not models. It translates HF's JSON to and from `DbrxConfig`'s fields
(`DbrxConfig.from_hf` / `to_hf` are its front door) and HF's tensor layouts to and from our
parameters' (io/pretrained.py and io/convert.py apply them). The released flat `[E*F, D]` expert
layout lives here and nowhere else:

    HF                                       ours
    transformer.wte.weight      [V, D]       wte               [V, D]
    ...attn.Wqkv.weight         [(N+2K)H, D] blocks.attn.wqkv  [L, D, K, J, H] (grouped per KV head)
    ...attn.out_proj.weight     [D, N*H]     blocks.attn.out   [L, N, H, D]
    ...ffn.router.layer.weight  [E, D]       blocks.ffn.router [L, D, E]
    ...ffn.experts.mlp.w1 / v1  [E*F, D]     blocks.ffn.w1/v1  [L, E, D, F] (reshape, transpose)
    ...ffn.experts.mlp.w2       [E*F, D]     blocks.ffn.w2     [L, E, F, D] (reshape, NO transpose)
    transformer.norm_f.weight   [D]          norm_f.scale      [D]
    lm_head.weight              [V, D]       lm_head           [D, V]

Shape letters as in dbrx_jax/model/__init__.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from dbrx_jax.io import files
from dbrx_jax.io.safetensors import FLOAT_DTYPES, INDEX_FILE, SINGLE_FILE, SafetensorsCheckpoint

if TYPE_CHECKING:  # for annotations only: config.py imports this module
    from dbrx_jax.config import DbrxConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer some third-party copies saved

# ---------------------------------------------------------------------------------------------
# config.json

# HF `ffn_act_fn` names -> ours, and back.
_ACTIVATIONS_FROM_HF = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}
_ACTIVATIONS_TO_HF = {
    "silu": "silu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_pytorch_tanh",
    "relu": "relu",
}
_TOP_LEVEL = (
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
)
_ATTN_CONFIG = ("attn_pdrop", "clip_qkv", "kv_n_heads")
_FFN_CONFIG = (
    "ffn_hidden_size",
    "moe_num_experts",
    "moe_top_k",
    "moe_jitter_eps",
    "moe_loss_weight",
    "moe_normalize_expert_weights",
)
_FLOATS = (
    "clip_qkv",
    "rope_theta",
    "moe_jitter_eps",
    "moe_loss_weight",
    "moe_normalize_expert_weights",
    "resid_pdrop",
    "emb_pdrop",
    "attn_pdrop",
    "initializer_range",
)


def read_config_json(source: Mapping[str, Any] | str | os.PathLike) -> tuple[dict, str]:
    """The raw config.json dict (from a dict, the file, or the directory holding it) and where it
    came from, for error messages."""
    if isinstance(source, Mapping):
        return dict(source), "config dict"
    path = os.fspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such directory (expected an HF checkpoint)")
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_FILE)
    return files.read_json(path, "a transformers config.json object"), path


def config_fields(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`DbrxConfig` fields from a transformers DBRX config.json dict. Fields it does not set keep
    DbrxConfig's defaults, which are HF's, so a partial file means what it means to transformers.
    Both places of the RoPE base are read (see `_rope_theta`)."""
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    if model_type not in (None, "dbrx") or (
        architectures and not any(a.startswith("Dbrx") for a in architectures)
    ):
        raise ValueError(
            f"{where}: not a DBRX config (model_type={model_type!r}, "
            f"architectures={architectures!r}); expected model_type 'dbrx'"
        )
    attn, ffn = hf.get("attn_config") or {}, hf.get("ffn_config") or {}
    for name, sub in (("attn_config", attn), ("ffn_config", ffn)):
        if not isinstance(sub, dict):
            raise ValueError(f"{where}: {name} must be a JSON object, got {sub!r}")
    fields: dict[str, Any] = {k: hf[k] for k in _TOP_LEVEL if hf.get(k) is not None}
    fields |= {k: attn[k] for k in _ATTN_CONFIG if k in attn}
    fields |= {k: ffn[k] for k in _FFN_CONFIG if k in ffn}
    act = ffn.get("ffn_act_fn") or {"name": "silu"}
    act_name = act.get("name") if isinstance(act, dict) else act
    if act_name not in _ACTIVATIONS_FROM_HF:
        raise ValueError(
            f"{where}: ffn_config.ffn_act_fn={act!r} is not supported; expected one of "
            f"{sorted(_ACTIVATIONS_FROM_HF)}"
        )
    fields["ffn_act_fn"] = _ACTIVATIONS_FROM_HF[act_name]
    theta = _rope_theta(hf, attn, where)
    if theta is not None:
        fields["rope_theta"] = theta
    for key in _FLOATS:
        if fields.get(key) is not None:
            fields[key] = float(fields[key])
    if isinstance(fields.get("eos_token_id"), list):
        fields["eos_token_id"] = tuple(fields["eos_token_id"])
    return fields


def _rope_theta(hf: Mapping[str, Any], attn: Mapping[str, Any], where: str) -> float | None:
    """The RoPE base. transformers >= 5 computes with `rope_parameters.rope_theta` and ignores
    `attn_config.rope_theta`; the original DBRX code reads only the latter.

    - Only `rope_parameters` (or a top-level `rope_theta`): that value.
    - Only `attn_config.rope_theta` (the released config.json): that value, as DBRX computes.
      transformers >= 5 would run such a file at its default base, 10000.
    - Both, disagreeing (what transformers 5 writes for a model built with
      `attn_config={"rope_theta": ...}`): transformers' own reading is unambiguous, so the value
      it computes with, `rope_parameters.rope_theta`, with a warning naming both.
    """
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
        log.warning(
            "%s: rope_parameters.rope_theta=%s and attn_config.rope_theta=%s disagree; using %s, "
            "the base transformers >= 5 computes with (it ignores attn_config.rope_theta). The "
            "released DBRX uses 500000.",
            where,
            v5,
            legacy,
            v5,
        )
    elif v5 is None and legacy is not None:
        log.info(
            "%s: rope_theta=%s from attn_config.rope_theta (the original DBRX format; transformers "
            ">= 5 would run this file with its default base 10000)",
            where,
            legacy,
        )
    return v5 if v5 is not None else legacy


def config_json(config: DbrxConfig) -> dict[str, Any]:
    """The transformers config.json dict. RoPE's base is written in both places, so every
    transformers release and the original code read the same value."""
    out: dict[str, Any] = {
        "architectures": ["DbrxForCausalLM"],
        "model_type": "dbrx",
        "d_model": config.d_model,
        "n_heads": config.n_heads,
        "n_layers": config.n_layers,
        "max_seq_len": config.max_seq_len,
        "vocab_size": config.vocab_size,
        "resid_pdrop": config.resid_pdrop,
        "emb_pdrop": config.emb_pdrop,
        "initializer_range": config.initializer_range,
        "tie_word_embeddings": False,
        "use_cache": True,
        "output_router_logits": False,
        "attn_config": {
            "attn_pdrop": config.attn_pdrop,
            "clip_qkv": config.clip_qkv,
            "kv_n_heads": config.kv_n_heads,
            "rope_theta": config.rope_theta,
        },
        "ffn_config": {
            "ffn_act_fn": {"name": _ACTIVATIONS_TO_HF[config.ffn_act_fn]},
            "ffn_hidden_size": config.ffn_hidden_size,
            "moe_num_experts": config.moe_num_experts,
            "moe_top_k": config.moe_top_k,
            "moe_jitter_eps": config.moe_jitter_eps,
            "moe_loss_weight": config.moe_loss_weight,
            "moe_normalize_expert_weights": config.moe_normalize_expert_weights,
        },
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "dtype": config.param_dtype,
    }
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, key)
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def generation_config_json(config: DbrxConfig) -> dict[str, Any]:
    """generation_config.json: the token ids the config sets (DBRX stops on both eos ids)."""
    out = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, key)
        if value is not None:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def stored_dtype(hf: Mapping[str, Any]) -> str | None:
    """The dtype config.json says the weights were saved in (`dtype`, or the older
    `torch_dtype`), as written there; None if it says nothing."""
    return hf.get("dtype") or hf.get("torch_dtype")


# ---------------------------------------------------------------------------------------------
# Tensors. Each layout change takes numpy or jax arrays: numpy when loading into host memory,
# jax when the converter jits it (XLA transposes the large expert pieces faster than numpy).

Layout = Callable[[np.ndarray, "DbrxConfig"], np.ndarray]


def _xp(w):
    return jnp if isinstance(w, jax.Array) else np


def _same(w, c):
    return w


def _transpose(w, c):
    return w.T


def _wqkv_to_ours(w, c):
    K, G, H, D = c.kv_n_heads, c.n_kv_groups, c.head_dim, c.d_model
    q_KGHD = w[: K * G * H].reshape(K, G, H, D)
    k_K1HD = w[K * G * H : (K * G + K) * H].reshape(K, 1, H, D)
    v_K1HD = w[(K * G + K) * H :].reshape(K, 1, H, D)
    return _xp(w).concatenate([q_KGHD, k_K1HD, v_K1HD], axis=1).transpose(3, 0, 1, 2)


def _wqkv_to_hf(w_DKJH, c):
    K, G, H, D = c.kv_n_heads, c.n_kv_groups, c.head_dim, c.d_model
    w_KJHD = w_DKJH.transpose(1, 2, 3, 0)
    return _xp(w_DKJH).concatenate(
        [
            w_KJHD[:, :G].reshape(K * G * H, D),
            w_KJHD[:, G].reshape(K * H, D),
            w_KJHD[:, G + 1].reshape(K * H, D),
        ],
        axis=0,
    )


def _out_to_ours(w, c):
    return w.T.reshape(c.n_heads, c.head_dim, c.d_model)


def _out_to_hf(w_NHD, c):
    return w_NHD.reshape(c.d_model, c.d_model).T


def _experts_EDF(w, c):
    return w.reshape(c.moe_num_experts, c.ffn_hidden_size, c.d_model).transpose(0, 2, 1)


def _experts_EDF_to_hf(w_EDF, c):
    return w_EDF.transpose(0, 2, 1).reshape(-1, c.d_model)


def _experts_EFD(w, c):
    return w.reshape(c.moe_num_experts, c.ffn_hidden_size, c.d_model)


def _experts_EFD_to_hf(w_EFD, c):
    return w_EFD.reshape(-1, c.d_model)


def _vocab_shape(c):
    return (c.vocab_size, c.d_model)


def _norm_shape(c):
    return (c.d_model,)


def _wqkv_shape(c):
    return (c.d_model + 2 * c.kv_n_heads * c.head_dim, c.d_model)


def _out_shape(c):
    return (c.d_model, c.d_model)


def _router_shape(c):
    return (c.moe_num_experts, c.d_model)


def _experts_shape(c):
    return (c.moe_num_experts * c.ffn_hidden_size, c.d_model)


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One HF tensor (per layer where `hf_name` has "{i}") and the parameter it becomes."""

    hf_name: str
    path: tuple[str, ...]  # our parameter, stacked over layers for per-layer tensors
    hf_shape: Callable[[DbrxConfig], tuple[int, ...]]
    to_ours: Layout
    to_hf: Layout

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name

    @property
    def per_expert(self) -> bool:
        """An expert tensor: expert e owns rows e*F .. (e+1)*F - 1 of the HF tensor."""
        return self.path[-2:-1] == ("ffn",) and self.path[-1] in ("w1", "v1", "w2")


_ATTN = "transformer.blocks.{i}.norm_attn_norm."
_FFN = "transformer.blocks.{i}.ffn."
# fmt: off
TENSOR_MAPS: tuple[TensorMap, ...] = (
    TensorMap("transformer.wte.weight", ("wte",), _vocab_shape, _same, _same),
    TensorMap(_ATTN + "norm_1.weight", ("blocks", "norm_1", "scale"), _norm_shape, _same, _same),
    TensorMap(_ATTN + "attn.Wqkv.weight", ("blocks", "attn", "wqkv"), _wqkv_shape,
              _wqkv_to_ours, _wqkv_to_hf),
    TensorMap(_ATTN + "attn.out_proj.weight", ("blocks", "attn", "out"), _out_shape,
              _out_to_ours, _out_to_hf),
    TensorMap(_ATTN + "norm_2.weight", ("blocks", "norm_2", "scale"), _norm_shape, _same, _same),
    TensorMap(_FFN + "router.layer.weight", ("blocks", "ffn", "router"), _router_shape,
              _transpose, _transpose),
    TensorMap(_FFN + "experts.mlp.w1", ("blocks", "ffn", "w1"), _experts_shape,
              _experts_EDF, _experts_EDF_to_hf),
    TensorMap(_FFN + "experts.mlp.v1", ("blocks", "ffn", "v1"), _experts_shape,
              _experts_EDF, _experts_EDF_to_hf),
    TensorMap(_FFN + "experts.mlp.w2", ("blocks", "ffn", "w2"), _experts_shape,
              _experts_EFD, _experts_EFD_to_hf),
    TensorMap("transformer.norm_f.weight", ("norm_f", "scale"), _norm_shape, _same, _same),
    TensorMap("lm_head.weight", ("lm_head",), _vocab_shape, _transpose, _transpose),
)
# fmt: on


def tensor_names(row: TensorMap, config: DbrxConfig) -> list[str]:
    """The HF tensor names of a row: one per layer for per-layer rows."""
    if not row.per_layer:
        return [row.hf_name]
    return [row.hf_name.format(i=i) for i in range(config.n_layers)]


def expected_tensors(config: DbrxConfig) -> dict[str, TensorMap]:
    """Every tensor name of a checkpoint of this config -> its row."""
    return {name: row for row in TENSOR_MAPS for name in tensor_names(row, config)}


def check_checkpoint(ckpt: SafetensorsCheckpoint, config: DbrxConfig) -> None:
    """Every expected tensor is present with the expected shape and a float dtype, and nothing
    else is there; otherwise a ValueError naming the tensor, its file and what was expected."""
    expected = expected_tensors(config)
    for name, row in expected.items():
        if name not in ckpt:
            raise ValueError(
                f"{ckpt.directory}: missing tensor {name!r} (expected shape "
                f"{list(row.hf_shape(config))})"
            )
        shape, dtype = ckpt.shape(name), ckpt.dtype(name)
        if shape != row.hf_shape(config):
            raise ValueError(
                f"{ckpt.path_of(name)}: tensor {name!r} has shape {list(shape)}, "
                f"expected {list(row.hf_shape(config))}"
            )
        if dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"{ckpt.path_of(name)}: tensor {name!r} has dtype {dtype}, "
                "expected a floating-point dtype"
            )
    for name in ckpt:
        if name not in expected and not name.endswith(IGNORED_SUFFIXES):
            raise ValueError(
                f"{ckpt.path_of(name)}: unexpected tensor {name!r} (not part of a "
                f"DBRX model with n_layers={config.n_layers})"
            )


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` looks like a Hugging Face checkpoint directory: config.json plus
    model.safetensors or its index."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and any(
        os.path.isfile(os.path.join(path, name)) for name in (SINGLE_FILE, INDEX_FILE)
    )


CHECKPOINT_OUTPUT = files.OutputKind("a Hugging Face checkpoint", is_checkpoint)
