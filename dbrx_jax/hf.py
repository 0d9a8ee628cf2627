"""The Hugging Face DBRX format: tensor names, their layouts, and `from_pretrained`.

Every HF tensor maps to one of our parameters by a `TensorMap` row: the name, the HF shape, and
the two layout changes. The flattened `[E*F, D]` expert layout lives here and nowhere else:

    HF                                     ours
    transformer.wte.weight     [V, D]      wte              [V, D]
    ...attn.Wqkv.weight        [(N+2K)H, D] blocks.attn.wqkv [L, D, K, G+2, H] (grouped per kv head)
    ...attn.out_proj.weight    [D, N*H]    blocks.attn.out  [L, N, H, D]
    ...ffn.router.layer.weight [E, D]      blocks.ffn.router [L, D, E]
    ...ffn.experts.mlp.w1 / v1 [E*F, D]    blocks.ffn.w1/v1 [L, E, D, F]  (reshape, transpose)
    ...ffn.experts.mlp.w2      [E*F, D]    blocks.ffn.w2    [L, E, F, D]  (reshape, NO transpose)
    lm_head.weight             [V, D]      lm_head          [D, V]
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dbrx_jax.config import DTYPES, DbrxConfig, read_hf_config
from dbrx_jax.model import Dbrx
from dbrx_jax.safetensors_io import FLOAT_DTYPES, SafetensorsCheckpoint

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer some third-party copies saved

# Layout changes take numpy or jax arrays (so the converter can jit them: XLA transposes a
# 132 MB expert piece 3x faster than numpy).
Layout = Callable[[np.ndarray, DbrxConfig], np.ndarray]


def _same(w: np.ndarray, c: DbrxConfig) -> np.ndarray:
    return w


def _transpose(w: np.ndarray, c: DbrxConfig) -> np.ndarray:
    return w.T


def _xp(w):
    """numpy for host arrays (loading), jax.numpy when the converter jits the layout change."""
    return jnp if isinstance(w, jax.Array) else np


def _wqkv_to_ours(w: np.ndarray, c: DbrxConfig) -> np.ndarray:
    K, G, H, D = c.kv_n_heads, c.n_kv_groups, c.head_dim, c.d_model
    q_KGHD = w[: K * G * H].reshape(K, G, H, D)
    k_K1HD = w[K * G * H : (K * G + K) * H].reshape(K, 1, H, D)
    v_K1HD = w[(K * G + K) * H :].reshape(K, 1, H, D)
    return _xp(w).concatenate([q_KGHD, k_K1HD, v_K1HD], axis=1).transpose(3, 0, 1, 2)


def _wqkv_to_hf(w_DKJH: np.ndarray, c: DbrxConfig) -> np.ndarray:
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


def _out_to_ours(w: np.ndarray, c: DbrxConfig) -> np.ndarray:
    return w.T.reshape(c.n_heads, c.head_dim, c.d_model)


def _out_to_hf(w_NHD: np.ndarray, c: DbrxConfig) -> np.ndarray:
    return w_NHD.reshape(c.d_model, c.d_model).T


def _experts_EDF(w: np.ndarray, c: DbrxConfig) -> np.ndarray:
    return w.reshape(c.moe_num_experts, c.ffn_hidden_size, c.d_model).transpose(0, 2, 1)


def _experts_EDF_to_hf(w_EDF: np.ndarray, c: DbrxConfig) -> np.ndarray:
    return w_EDF.transpose(0, 2, 1).reshape(-1, c.d_model)


def _experts_EFD(w: np.ndarray, c: DbrxConfig) -> np.ndarray:
    return w.reshape(c.moe_num_experts, c.ffn_hidden_size, c.d_model)


def _experts_EFD_to_hf(w_EFD: np.ndarray, c: DbrxConfig) -> np.ndarray:
    return w_EFD.reshape(-1, c.d_model)


@dataclasses.dataclass(frozen=True)
class TensorMap:
    hf_name: str  # "{i}" stands for the layer index
    path: tuple[str, ...]  # our parameter (stacked over layers when hf_name has "{i}")
    hf_shape: Callable[[DbrxConfig], tuple[int, ...]]
    to_ours: Layout
    to_hf: Layout

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name


def _vocab_shape(c: DbrxConfig) -> tuple[int, ...]:
    return (c.vocab_size, c.d_model)


def _norm_shape(c: DbrxConfig) -> tuple[int, ...]:
    return (c.d_model,)


def _wqkv_shape(c: DbrxConfig) -> tuple[int, ...]:
    return (c.d_model + 2 * c.kv_n_heads * c.head_dim, c.d_model)


def _out_shape(c: DbrxConfig) -> tuple[int, ...]:
    return (c.d_model, c.d_model)


def _router_shape(c: DbrxConfig) -> tuple[int, ...]:
    return (c.moe_num_experts, c.d_model)


def _experts_shape(c: DbrxConfig) -> tuple[int, ...]:
    return (c.moe_num_experts * c.ffn_hidden_size, c.d_model)


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


def expected_hf_tensors(config: DbrxConfig) -> dict[str, TensorMap]:
    """Every tensor name of a checkpoint of this config -> its row."""
    names: dict[str, TensorMap] = {}
    for row in TENSOR_MAPS:
        layers = range(config.n_layers) if row.per_layer else [None]
        names.update((row.hf_name.format(i=i), row) for i in layers)
    return names


def check_hf_checkpoint(ckpt: SafetensorsCheckpoint, config: DbrxConfig) -> None:
    """Every expected tensor is present with the expected shape and a float dtype, and nothing
    else is there; otherwise a ValueError naming the tensor, its file and the expected shape."""
    expected = expected_hf_tensors(config)
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


def load_param(
    ckpt: SafetensorsCheckpoint, row: TensorMap, config: DbrxConfig, dtype: np.dtype
) -> np.ndarray:
    """One of our parameters in our layout, stacked over layers for per-layer rows. Reads one HF
    tensor at a time from the memory map; the result is the only full-size copy made."""
    if not row.per_layer:
        return row.to_ours(ckpt.get(row.hf_name), config).astype(dtype)
    first = row.to_ours(ckpt.get(row.hf_name.format(i=0)), config)
    out = np.empty((config.n_layers, *first.shape), dtype)
    out[0] = first
    for i in range(1, config.n_layers):
        out[i] = row.to_ours(ckpt.get(row.hf_name.format(i=i)), config)
    return out


def _checkpoint_dtype(hf_dir: str) -> str:
    raw, _ = read_hf_config(hf_dir)
    name = raw.get("dtype") or raw.get("torch_dtype")
    return name if name in DTYPES else "float32"


def param_variables(model: Dbrx) -> dict[tuple[str, ...], nnx.Param]:
    """Every nnx.Param of `model` by its path (concrete or abstract)."""
    return {path: v for path, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}


def from_pretrained(
    path: str | os.PathLike, dtype: str | None = None, param_dtype: str | None = None, **overrides
) -> Dbrx:
    """Loads a Hugging Face DBRX directory (`config.json` plus `model.safetensors` or sharded
    files with `model.safetensors.index.json`) into a `Dbrx` model, without torch; or one of
    our params-only exports (`checkpoint.export_params`).

    dtype: the compute dtype; defaults to the checkpoint's (`config.json`'s `dtype`).
    param_dtype: the stored parameters' dtype; defaults to `dtype`.
    overrides: any other `DbrxConfig` field (attention_impl, remat_policy, max_seq_len, ...).
    """
    path = os.fspath(path)
    from dbrx_jax import checkpoint  # Orbax: only for our exports, not at import

    if checkpoint.is_export(path):
        return _from_export(path, dtype, param_dtype, overrides)
    dtype = dtype or _checkpoint_dtype(path)
    config = DbrxConfig.from_hf(path, dtype=dtype, param_dtype=param_dtype or dtype, **overrides)
    ckpt = SafetensorsCheckpoint(path)
    check_hf_checkpoint(ckpt, config)
    model = nnx.eval_shape(lambda: Dbrx(config, rngs=nnx.Rngs(0)))
    params = param_variables(model)
    for row in TENSOR_MAPS:
        variable = params[row.path]
        value = load_param(ckpt, row, config, np.dtype(config.weight_dtype))
        assert value.shape == variable.shape, (row.hf_name, value.shape, variable.shape)
        variable.set_value(jnp.asarray(value))
        del value
    missing = [p for p, v in params.items() if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    assert not missing, f"parameters without an HF tensor: {missing}"
    return model


def _from_export(path: str, dtype, param_dtype, overrides) -> Dbrx:
    from dbrx_jax import checkpoint

    stored = checkpoint.load_export_config(path)
    changes = dict(overrides)
    if dtype:
        changes.update(dtype=dtype, param_dtype=param_dtype or dtype)
    config = stored.replace(**changes)
    _, abstract = nnx.split(nnx.eval_shape(lambda: Dbrx(stored, rngs=nnx.Rngs(0))), nnx.Param)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract
    )
    params = checkpoint.restore_params(path, abstract)
    model = nnx.eval_shape(lambda: Dbrx(config, rngs=nnx.Rngs(0)))
    nnx.update(model, jax.tree.map(lambda x: x.astype(config.weight_dtype), params))
    return model


def hf_state_dict(model: Dbrx) -> dict[str, np.ndarray]:
    """The model's parameters as Hugging Face tensors (names and layouts), in their stored dtype,
    as host numpy arrays (the whole model at once)."""
    config = model.config
    params = param_variables(model)
    tensors: dict[str, np.ndarray] = {}
    for row in TENSOR_MAPS:
        value = np.asarray(params[row.path].get_value())
        if row.per_layer:
            for i in range(config.n_layers):
                tensors[row.hf_name.format(i=i)] = np.ascontiguousarray(row.to_hf(value[i], config))
        else:
            tensors[row.hf_name] = np.ascontiguousarray(row.to_hf(value, config))
    return tensors
