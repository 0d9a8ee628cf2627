"""`from_pretrained`: one entry for every saved model, a Hugging Face DBRX directory (read
without torch) or one of our params-only exports; and the way back to HF tensors.

Both load straight into the layout of the mesh they are given (each device reading its part of
an export; HF tensors placed by the sharding rules as they are read), so a model never needs to
fit on one device to be loaded onto many.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from dbrx_jax import sharding
from dbrx_jax.config import DbrxConfig, dtype_name
from dbrx_jax.io import checkpoint, hf_format
from dbrx_jax.io.safetensors import SafetensorsCheckpoint
from dbrx_jax.model import Dbrx

log = logging.getLogger(__name__)


def from_pretrained(
    path: str | os.PathLike,
    dtype: Any = None,
    param_dtype: Any = None,
    *,
    mesh: Mesh | None = None,
    **overrides: Any,
) -> Dbrx:
    """Loads a Hugging Face DBRX directory (`config.json` plus `model.safetensors`, or shards
    with `model.safetensors.index.json`) or one of our params-only exports into a `Dbrx`.

    dtype: the compute dtype, in any spelling ("bfloat16", jnp.bfloat16, ...); by default the
      checkpoint's (`config.json`'s `dtype`, or the export's).
    param_dtype: the stored parameters' dtype; defaults to `dtype`.
    mesh: build the model for this mesh, its parameters sharded by the rules as they load.
    overrides: any other `DbrxConfig` field (attention_impl, remat_policy, max_seq_len, ...).
    """
    path = os.fspath(path)
    if _is_export(path):
        return _from_export(path, dtype, param_dtype, mesh, overrides)
    if dtype is None:
        dtype = _checkpoint_dtype(path)
    config = DbrxConfig.from_hf(path, dtype=dtype, param_dtype=param_dtype or dtype, **overrides)
    ckpt = SafetensorsCheckpoint(path)
    hf_format.check_checkpoint(ckpt, config)
    model = nnx.eval_shape(lambda: Dbrx(config, rngs=nnx.Rngs(0), mesh=mesh))
    params = param_variables(model)
    for row in hf_format.TENSOR_MAPS:
        variable = params[row.path]
        value = _load_param(ckpt, row, config, np.dtype(config.weight_dtype))
        assert value.shape == variable.shape, (row.hf_name, value.shape, variable.shape)
        variable.set_value(_place(value, variable, mesh))
        del value
    missing = [p for p, v in params.items() if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    assert not missing, f"parameters without an HF tensor: {missing}"
    return model


def _is_export(path: str) -> bool:
    """True for one of our exports, False for anything else (read as an HF directory, whose
    reader says what is missing); a directory that holds both is refused."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (expected an HF checkpoint or an export)")
    if checkpoint.is_export(path) and hf_format.is_checkpoint(path):
        raise ValueError(
            f"{path} holds both a dbrx_jax export ({checkpoint.EXPORT_CONFIG}) and a Hugging "
            f"Face checkpoint ({hf_format.CONFIG_FILE}); keep each in its own directory"
        )
    return checkpoint.is_export(path)


def _checkpoint_dtype(hf_dir: str) -> str:
    raw, where = hf_format.read_config_json(hf_dir)
    stored = hf_format.stored_dtype(raw)
    try:
        return dtype_name(stored) if stored is not None else "float32"
    except ValueError:
        log.warning("%s: dtype %r is not a float dtype we compute in; using float32", where, stored)
        return "float32"


def _load_param(
    ckpt: SafetensorsCheckpoint, row: hf_format.TensorMap, config: DbrxConfig, dtype: np.dtype
) -> np.ndarray:
    """One of our parameters in our layout, stacked over layers for per-layer rows. Reads one HF
    tensor at a time from the memory map; the result is the only full-size copy made."""
    names = hf_format.tensor_names(row, config)
    if not row.per_layer:
        return row.to_ours(ckpt.get(names[0]), config).astype(dtype)
    first = row.to_ours(ckpt.get(names[0]), config)
    out = np.empty((config.n_layers, *first.shape), dtype)
    out[0] = first
    for i, name in enumerate(names[1:], start=1):
        out[i] = row.to_ours(ckpt.get(name), config)
    return out


def _place(value: np.ndarray, variable: nnx.Param, mesh: Mesh | None) -> jax.Array:
    if mesh is None:
        return jnp.asarray(value)
    return jax.device_put(value, sharding.variable_sharding(variable, mesh))


def param_variables(model: Dbrx) -> dict[tuple[str, ...], nnx.Param]:
    """Every nnx.Param of `model` by its path (concrete or abstract)."""
    return {path: v for path, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}


def _abstract_params(config: DbrxConfig, mesh: Mesh | None):
    """(graphdef, params as ShapeDtypeStructs carrying their shardings on `mesh`, or on the
    default device)."""
    graphdef, params = nnx.split(
        nnx.eval_shape(lambda: Dbrx(config, rngs=nnx.Rngs(0), mesh=mesh)), nnx.Param
    )
    return graphdef, sharding.abstract_on(params, mesh)


def _from_export(path: str, dtype, param_dtype, mesh: Mesh | None, overrides) -> Dbrx:
    stored = checkpoint.load_export_config(path)
    graphdef, abstract = _abstract_params(stored, mesh)
    params = checkpoint.restore_params(path, abstract)
    changes = dict(overrides)
    if dtype is not None:
        changes.update(dtype=dtype, param_dtype=param_dtype or dtype)
    elif param_dtype is not None:
        changes.update(param_dtype=param_dtype)
    config = stored.replace(**changes)
    if config != stored:  # the model's graph holds its config
        graphdef, _ = _abstract_params(config, mesh)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(config.weight_dtype), params))


def load_params(path: str, config: DbrxConfig, abstract_params):
    """Parameters for a training run's `init_from`: from an export or an HF directory, laid out
    as `abstract_params`' shardings say; the architecture must be the run's."""
    if _is_export(path):
        stored = checkpoint.load_export_config(path)
        checkpoint.check_same_model({"architecture": stored.architecture()}, config, path)
        return checkpoint.restore_params(path, abstract_params)
    source = from_pretrained(path, dtype=config.param_dtype)
    checkpoint.check_same_model({"architecture": source.config.architecture()}, config, path)
    params = nnx.state(source, nnx.Param)
    return jax.device_put(params, jax.tree.map(lambda x: x.sharding, abstract_params))


def hf_state_dict(model: Dbrx) -> dict[str, np.ndarray]:
    """The model's parameters as Hugging Face tensors (names and layouts), in their stored dtype,
    as host numpy arrays (the whole model at once)."""
    config = model.config
    params = param_variables(model)
    tensors: dict[str, np.ndarray] = {}
    for row in hf_format.TENSOR_MAPS:
        value = np.asarray(params[row.path].get_value())
        names = hf_format.tensor_names(row, config)
        layers = value if row.per_layer else [value]
        for name, layer_value in zip(names, layers, strict=True):
            tensors[name] = np.ascontiguousarray(row.to_hf(layer_value, config))
    return tensors
