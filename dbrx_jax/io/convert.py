"""Streaming conversion between the released HF safetensors and our params-only exports.

hf_to_jax reads one tensor (experts: one expert's rows) at a time with plain file reads, changes
its layout (io/hf_format.py) and writes it into the stacked `[L, ...]` arrays of an Orbax
checkpoint, so memory stays near the size of one piece whatever the model's size. The Orbax
directory's metadata is written by Orbax itself (a save of one-element placeholders with the
same tree); the array payloads, uncompressed zarr arrays with the full shapes, are streamed in
as their chunk files (tensorstore where a piece is not made of whole chunks). `from_pretrained`
and training's `init_from` then restore it onto any mesh, each device reading just its chunks.

Speed: each piece is read, laid out and written by one of WORKERS threads into buffers that
thread reuses (no page faults per piece); layouts are numpy views copied once in cache-sized
tiles, on the raw bits. Like a plain copy, nothing is fsync'ed: the rename into place (below)
guards against interrupted writes, not against power loss.

jax_to_hf goes the other way into ~5 GB `model-0000N-of-0000M.safetensors` shards with an
index, `config.json` and `generation_config.json`, writing each file front to back. Tokenizer
files of the input are copied along both ways; an export without any that has DBRX's vocabulary
gets DBRX's tokenizer (io/hf_tokenizer.py, with dbrx-instruct's chat template), so
AutoTokenizer and lm-evaluation-harness load the output.

Both write their output by the one rule of io/files.py: into `<output>.partial`, renamed into
place when complete; never over an input; an existing output replaced only with `overwrite` and
only if it is of the kind being written. jax_to_hf reads an export in either layout Orbax writes
(OCDBT, as training exports are, or plain zarr, as hf_to_jax writes) and refuses a missing or
unreadable chunk instead of reading it as zeros.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import json
import logging
import math
import os
import pathlib
import shutil
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx
from tqdm import tqdm

from dbrx_jax import chat, sharding, tokenizer
from dbrx_jax.config import DTYPES, DbrxConfig, dtype_name
from dbrx_jax.io import checkpoint, files, hf_format, hf_tokenizer
from dbrx_jax.io.hf_format import TENSOR_MAPS, TensorMap
from dbrx_jax.io.pretrained import param_variables
from dbrx_jax.io.safetensors import SafetensorsCheckpoint, SafetensorsWriter, read_into
from dbrx_jax.model import Dbrx

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tiktoken.py",
    "tokenizer.model",
)
SHARD_BYTES = 5 * 10**9

log = logging.getLogger(__name__)


def _progress(total_bytes: int, desc: str, enabled: bool):
    return tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        desc=desc,
        disable=not enabled,
        dynamic_ncols=True,
    )


def _copy_tokenizer_files(source: str, target: str) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), target)
            copied.append(name)
    return copied


def _tokenizer_files(source: str, target: str, config: DbrxConfig) -> None:
    """The tokenizer files of `source`, or for a DBRX-sized vocabulary without any, DBRX's
    tokenizer built from the bundled cl100k_base ranks."""
    if _copy_tokenizer_files(source, target):
        return
    if config.vocab_size != tokenizer.DBRX_MODEL_VOCAB_SIZE:
        return
    written = hf_tokenizer.write_hf_tokenizer(target, chat_template=chat.chat_template())
    log.info(
        "%s has no tokenizer files; wrote DBRX's tokenizer (cl100k_base + DBRX's special "
        "tokens, dbrx-instruct's chat template): %s",
        source,
        ", ".join(written),
    )


def pieces(row: TensorMap, config: DbrxConfig):
    """(HF row range, config for the piece's layout change) per piece of one HF tensor: every
    expert's rows separately, other tensors whole."""
    if row.per_expert:
        F = config.ffn_hidden_size
        one = config.replace(moe_num_experts=1, moe_top_k=1)
        return [(slice(e * F, (e + 1) * F), one, e) for e in range(config.moe_num_experts)]
    return [(slice(None), config, None)]


def _chunks(row: TensorMap, variable: nnx.Param, mesh_sizes) -> list[int]:
    """Zarr chunk of a stacked parameter: one layer, split as one device of `mesh_sizes` holds it
    (by default one expert), so a sharded restore reads only what each device needs."""
    shape = variable.shape
    spec = sharding.logical_to_spec(variable.get_metadata("logical_axes"), shape, mesh_sizes)
    block = list(sharding.shard_shape(shape, spec, mesh_sizes))
    if row.per_layer:
        block[0] = 1
    return block


def _param_dirs(params_dir: str, model: Dbrx) -> dict[tuple[str, ...], str]:
    """Lets Orbax write the checkpoint's metadata with one-element placeholders of the
    (abstract) model's parameter tree, and returns where each parameter's array lives in it."""
    placeholders = jax.tree.map(lambda x: jnp.zeros((1,), x.dtype), nnx.state(model, nnx.Param))
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=False)
    with files.termination_deferred():  # Orbax's threads would write on after an exception
        ocp.Checkpointer(handler).save(params_dir, placeholders)
    return {
        row.path: os.path.join(params_dir, ".".join(row.path) + ".value") for row in TENSOR_MAPS
    }


def _patch_write_shapes(params_dir: str, chunks: dict[str, list[int]]) -> None:
    """Orbax records each array's write/chunk shape; make them the streamed arrays' chunks."""
    path = os.path.join(params_dir, "_METADATA")
    with open(path) as f:
        meta = json.load(f)
    for entry in meta.get("tree_metadata", {}).values():
        name = ".".join(k["key"] for k in entry["key_metadata"])
        if name in chunks and "write_shape" in entry.get("value_metadata", {}):
            entry["value_metadata"]["write_shape"] = chunks[name]
    with open(path, "w") as f:
        json.dump(meta, f)
    meta_dir = os.path.join(params_dir, "array_metadatas")
    for name in os.listdir(meta_dir) if os.path.isdir(meta_dir) else []:
        file = os.path.join(meta_dir, name)
        with open(file) as f:
            arrays = json.load(f)
        for item in arrays.get("array_metadatas", []):
            am = item.get("array_metadata", {})
            if am.get("param_name") in chunks:
                am["write_shape"] = am["chunk_shape"] = chunks[am["param_name"]]
        with open(file, "w") as f:
            json.dump(arrays, f)


def _zarr_dtype(dtype: np.dtype) -> str:
    return "bfloat16" if dtype.name == "bfloat16" else dtype.str


class _ZarrArray:
    """One parameter's zarr v2 array, written or read one piece (a layer, or one expert of one)
    at a time. A piece that is exactly one chunk of an uncompressed C-order array goes straight
    to or from its chunk file, which holds just the piece's bytes: no tensorstore copy, and
    reads land in a reused buffer. Anything else (other chunkings, OCDBT) goes through
    tensorstore."""

    def __init__(self, store: ts.TensorStore, path: str | None, zarray: dict | None):
        self.store = store
        self.path = path  # the array's directory when its chunks are plain files
        self.shape = tuple(store.shape)
        self.dtype = store.dtype.numpy_dtype
        self.chunks = None
        if (
            path is not None
            and zarray is not None
            and zarray.get("zarr_format") == 2
            and zarray.get("compressor") is None
            and not zarray.get("filters")
            and zarray.get("order", "C") == "C"
            and zarray.get("dimension_separator", ".") == "."
            and zarray.get("dtype") == _zarr_dtype(self.dtype)
            and len(zarray.get("chunks", ())) == len(self.shape)
        ):
            self.chunks = tuple(zarray["chunks"])

    @classmethod
    def create(cls, path: str, shape, chunks, dtype: np.dtype) -> _ZarrArray:
        shutil.rmtree(path)
        zarray = {
            "zarr_format": 2,
            "shape": list(shape),
            "chunks": list(chunks),
            "dtype": _zarr_dtype(dtype),
            "compressor": None,
        }
        spec = {
            "driver": "zarr",
            "kvstore": {"driver": "file", "path": path},
            "metadata": zarray,
            "create": True,
        }
        with files.termination_deferred():  # an interrupted wait leaves tensorstore writing
            store = ts.open(spec).result()
        return cls(store, path, zarray)

    def _chunk_files(self, index: tuple[int, ...]) -> list[tuple[tuple[slice, ...], str]] | None:
        """The chunk files that make up self[index], each with the part of it that it holds, if
        self[index] is made of whole chunks of a plain array (else None)."""
        if self.chunks is None:
            return None
        n = len(index)
        shape, chunks = self.shape[n:], self.chunks[n:]
        if any(c != 1 for c in self.chunks[:n]) or any(
            s % c for s, c in zip(shape, chunks, strict=True)
        ):
            return None
        grid = itertools.product(*(range(s // c) for s, c in zip(shape, chunks, strict=True)))
        return [
            (
                tuple(slice(i * c, (i + 1) * c) for i, c in zip(where, chunks, strict=True)),
                os.path.join(self.path, ".".join(map(str, [*index, *where])) or "0"),
            )
            for where in grid
        ]

    def write(self, index: tuple[int, ...], piece: np.ndarray) -> None:
        """self[index] = piece (of the array's dtype)."""
        files_ = self._chunk_files(index)
        if files_ is None:
            self.store[index].write(piece).result()
            return
        for part, file in files_:
            block = _bits(piece[part])
            if not block.flags.c_contiguous:  # a chunk across the piece's rows
                block = _copied(_scratch("chunk", block.shape, block.dtype), block)
            with open(file, "wb") as f:  # the chunk's bytes, C order, as zarr stores them
                f.write(memoryview(block.reshape(-1).view(np.uint8)))

    def read(self, index: tuple[int, ...], where: str) -> np.ndarray:
        """self[index], into this thread's reused buffer where it is made of chunk files; a
        missing or short chunk is a damaged export, never zeros."""
        files_ = self._chunk_files(index)
        if files_ is None:
            return _read(self.store, index, where)
        out = _scratch("read", self.shape[len(index) :], self.dtype)
        for part, file in files_:
            block = _bits(out[part])
            target = block
            if not block.flags.c_contiguous:
                target = _scratch("chunk", block.shape, block.dtype)
            try:
                with open(file, "rb", buffering=0) as f:
                    size = os.fstat(f.fileno()).st_size
                    if size != target.nbytes or read_into(f, target) != target.nbytes:
                        raise ValueError(
                            f"{where}: damaged export, chunk file {file} has {size} bytes, "
                            f"expected {target.nbytes}"
                        )
            except FileNotFoundError:
                raise ValueError(f"{where}: damaged export, chunk file {file} is missing") from None
            if target is not block:
                _copied(block, target)
        return out


def _bits(array: np.ndarray) -> np.ndarray:
    """The same memory as unsigned ints: copies of it then move bits, never float values."""
    return array.view(f"u{array.dtype.itemsize}")


def _copied(out: np.ndarray, view: np.ndarray) -> np.ndarray:
    np.copyto(out, view)
    return out


def hf_to_jax(
    hf_dir: str,
    output: str,
    *,
    dtype: Any = "keep",
    overwrite: bool = False,
    mesh_sizes: dict[str, int] | None = None,
    progress: bool = True,
) -> DbrxConfig:
    """HF DBRX directory -> our params-only export (see the module docstring)."""
    config = DbrxConfig.from_hf(hf_dir)
    ckpt = SafetensorsCheckpoint(hf_dir)
    hf_format.check_checkpoint(ckpt, config)
    dtype = _output_dtype(dtype, ckpt.dtype(TENSOR_MAPS[0].hf_name))
    config = config.replace(param_dtype=dtype, dtype=dtype)
    out_dtype = np.dtype(DTYPES[dtype])
    mesh_sizes = (
        {a: 1 for a in sharding.MESH_AXES} | {"expert": config.moe_num_experts} | (mesh_sizes or {})
    )
    total = (
        sum(
            int(np.prod(row.hf_shape(config))) * (config.n_layers if row.per_layer else 1)
            for row in TENSOR_MAPS
        )
        * out_dtype.itemsize
    )
    model = nnx.eval_shape(lambda: Dbrx(config, rngs=nnx.Rngs(0)))
    abstract = param_variables(model)
    inputs = [hf_dir, *(st.path for st in ckpt.files.values())]  # shards may be links elsewhere
    with files.output_directory(
        output, inputs=inputs, kind=checkpoint.EXPORT_OUTPUT, overwrite=overwrite
    ) as tmp:
        params_dir = os.path.join(tmp, checkpoint.EXPORT_PARAMS)
        dirs = _param_dirs(params_dir, model)
        chunk_shapes, jobs = {}, []
        for row in TENSOR_MAPS:
            variable = abstract[row.path]
            chunks = _chunks(row, variable, mesh_sizes)
            chunk_shapes[".".join(row.path) + ".value"] = chunks
            array = _ZarrArray.create(dirs[row.path], variable.shape, chunks, out_dtype)
            for layer in range(config.n_layers) if row.per_layer else [None]:
                for rows, piece_config, expert in pieces(row, config):
                    jobs.append((ckpt, row, layer, rows, piece_config, expert, array, out_dtype))
        with _progress(total, "hf_to_jax", progress) as bar:
            _run(_convert_piece, jobs, bar)
        _patch_write_shapes(params_dir, chunk_shapes)
        with open(os.path.join(tmp, checkpoint.EXPORT_CONFIG), "w") as f:
            f.write(config.to_json())
        _copy_tokenizer_files(hf_dir, tmp)
    return config


def _output_dtype(dtype: Any, source: Any) -> str:
    """The output dtype's name: `dtype` in any spelling, or the source's for "keep"."""
    try:
        return dtype_name(source if dtype == "keep" else dtype)
    except ValueError as e:
        raise ValueError(f"output {e} (or 'keep')") from None


WORKERS = 2  # pieces converted at once, each read, laid out and written by one thread
_TILE = 256  # square tiles of a transposing copy: 2 x 128 KiB of bf16, well inside L2
_SCRATCH = threading.local()


def _run(convert_piece, jobs: list[tuple], bar) -> None:
    """convert_piece(*job, bar) for every job on WORKERS threads, at most 2 * WORKERS queued. A
    failure or an interruption (SIGTERM, Ctrl-C) cancels the queued pieces and returns once the
    running ones end, so that nothing writes into the output after this returns."""
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        in_flight = collections.deque()
        try:
            for job in jobs:
                in_flight.append(pool.submit(convert_piece, *job, bar))
                while len(in_flight) > 2 * WORKERS:
                    in_flight.popleft().result()
            for future in in_flight:
                future.result()
        except BaseException:
            with files.termination_deferred():  # a second SIGTERM must not cut this wait short
                pool.shutdown(cancel_futures=True)  # queued pieces dropped, running ones waited for
            raise


def _scratch(role: str, shape, dtype: np.dtype) -> np.ndarray:
    """This thread's array for `role`, reused for every piece of the same shape and replaced when
    the shape changes: a new array per piece would pay a page fault (the kernel zeroing a page)
    every 4 KiB, more than the copy into it costs."""
    arrays = _SCRATCH.__dict__.setdefault("arrays", {})
    array = arrays.get(role)
    if array is None or array.shape != tuple(shape) or array.dtype != dtype:
        arrays.pop(role, None)  # free the old one first
        array = arrays[role] = np.empty(shape, dtype)
    return array


def _as_2d(view: np.ndarray, split: int) -> np.ndarray | None:
    """`view` as `[prod(shape[:split]), prod(shape[split:])]` without a copy, or None where its
    strides do not allow it."""
    dims = []
    for axes in (range(split), range(split, view.ndim)):
        axes = [a for a in axes if view.shape[a] != 1]
        if any(
            view.strides[a] != view.shape[b] * view.strides[b] for a, b in itertools.pairwise(axes)
        ):
            return None
        dims.append((math.prod(view.shape[a] for a in axes), view.strides[axes[-1]] if axes else 0))
    (rows, row_stride), (cols, col_stride) = dims
    return np.lib.stride_tricks.as_strided(view, (rows, cols), (row_stride, col_stride))


def _copy_tiled(out: np.ndarray, view: np.ndarray) -> None:
    """out[...] = view, for a C-contiguous `out`. Where `view` walks memory across its rows (a
    transpose), copies square tiles, so both sides stay in cache: about 3x faster than numpy's
    own copy of a large transposed view, and 2x XLA's transpose with its buffer allocations."""
    for split in range(1, view.ndim):
        src = _as_2d(view, split)
        if src is not None and src.strides[0] < src.strides[1]:
            dst = out.reshape(src.shape)
            for i in range(0, src.shape[0], _TILE):
                for j in range(0, src.shape[1], _TILE):
                    dst[i : i + _TILE, j : j + _TILE] = src[i : i + _TILE, j : j + _TILE]
            return
    np.copyto(out, view)


def _layout(change, piece: np.ndarray, config) -> np.ndarray:
    """`change` (a layout of io/hf_format) of `piece`, by numpy on the raw bits, so no NaN payload
    is ever canonicalised: its reshapes and transposes are views, copied once into this thread's
    reused array. An unchanged layout comes back as `piece` itself, without a copy."""
    view = change(_bits(piece), config)
    if view.flags.c_contiguous:  # a reshape of `piece`, or a concatenation numpy made
        return view.view(piece.dtype)
    out = _scratch("layout", view.shape, view.dtype)
    _copy_tiled(out, view)
    return out.view(piece.dtype)


def _convert_piece(ckpt, row, layer, rows, piece_config, expert, array, out_dtype, bar):
    """One HF tensor (or one expert's rows of it) -> its place in our stacked array."""
    name = row.hf_name.format(i=layer)
    shape, dtype = ckpt.shape(name), ckpt.dtype(name)
    start, stop = rows.start or 0, rows.stop or shape[0]
    hf_rows = _scratch("read", (stop - start, *shape[1:]), dtype)
    ckpt.file(name).read_rows_into(name, start, hf_rows)
    piece = _layout(row.to_ours, hf_rows, piece_config).astype(out_dtype, copy=False)
    if expert is not None:
        piece = piece[0]
    array.write(tuple(i for i in (layer, expert) if i is not None), piece)
    bar.update(piece.nbytes)


def _export_piece(array, row, layer, rows, piece_config, expert, writer, our_dir, out_dtype, bar):
    """One of our stacked arrays' layers (or one expert of it) -> its rows of the HF tensor."""
    index = tuple(i for i in (layer, expert) if i is not None)
    where = f"{our_dir}: {'.'.join(row.path)}" + "".join(f"[{i}]" for i in index)
    value = array.read(index, where)
    value = value[None] if expert is not None else value
    piece = _layout(row.to_hf, value, piece_config).astype(out_dtype, copy=False)
    writer.write_rows(row.hf_name.format(i=layer), rows.start or 0, np.ascontiguousarray(piece))
    bar.update(piece.nbytes)


def _open_params(our_dir: str, config: DbrxConfig) -> dict[tuple[str, ...], _ZarrArray]:
    """Every parameter array of an export, opened for reading in the layout Orbax recorded
    (OCDBT or not; zarr v2 or v3), with missing chunks an error rather than zeros, and checked
    against the shapes of `config`."""
    params_dir = os.path.join(our_dir, checkpoint.EXPORT_PARAMS)
    meta = files.read_json(os.path.join(params_dir, "_METADATA"), "Orbax checkpoint metadata")
    use_ocdbt, use_zarr3 = bool(meta.get("use_ocdbt")), bool(meta.get("use_zarr3"))
    context = ts.Context({"cache_pool#ocdbt": {}})
    model = nnx.eval_shape(lambda: Dbrx(config, rngs=nnx.Rngs(0)))
    abstract = param_variables(model)
    arrays = {}
    for row in TENSOR_MAPS:
        name = ".".join(row.path) + ".value"
        info = ocp.type_handlers.ParamInfo(
            name=name,
            parent_dir=pathlib.Path(params_dir),  # Orbax takes a Path
            is_ocdbt_checkpoint=use_ocdbt,
            use_zarr3=use_zarr3,
            ts_context=context,
            raise_array_data_missing_error=True,
        )
        spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
        try:
            array = ts.open(spec, open=True, read=True, context=context).result()
        except ValueError as e:
            raise ValueError(
                f"{params_dir}: parameter {name} is missing or unreadable ({e})"
            ) from None
        expected = abstract[row.path].shape
        if tuple(array.shape) != tuple(expected):
            raise ValueError(
                f"{params_dir}: parameter {name} has shape {list(array.shape)}, its "
                f"{checkpoint.EXPORT_CONFIG} expects {list(expected)}"
            )
        path = os.path.join(params_dir, name)
        plain = not use_ocdbt and not use_zarr3 and os.path.isfile(os.path.join(path, ".zarray"))
        zarray = files.read_json(os.path.join(path, ".zarray"), "zarr metadata") if plain else None
        arrays[row.path] = _ZarrArray(array, path if plain else None, zarray)
    return arrays


def _read(array: ts.TensorStore, index: tuple, what: str) -> np.ndarray:
    try:
        return np.asarray(array[index].read().result() if index else array.read().result())
    except ValueError as e:  # a missing or damaged chunk
        raise ValueError(f"{what}: damaged export, cannot read this array ({e})") from None


def jax_to_hf(
    our_dir: str,
    output: str,
    *,
    dtype: Any = "keep",
    overwrite: bool = False,
    shard_bytes: int = SHARD_BYTES,
    progress: bool = True,
) -> DbrxConfig:
    """Our params-only export -> an HF directory transformers' from_pretrained loads."""
    if not checkpoint.is_export(our_dir):
        raise FileNotFoundError(
            f"{our_dir}: not a params-only export (no {checkpoint.EXPORT_CONFIG})"
        )
    config = checkpoint.load_export_config(our_dir)
    arrays = _open_params(our_dir, config)
    dtype = _output_dtype(dtype, config.param_dtype)
    out_dtype = np.dtype(DTYPES[dtype])
    config = config.replace(param_dtype=dtype, dtype=dtype)

    order = [(row, None) for row in TENSOR_MAPS if not row.per_layer and row.path == ("wte",)]
    order += [(row, i) for i in range(config.n_layers) for row in TENSOR_MAPS if row.per_layer]
    order += [(row, None) for row in TENSOR_MAPS if not row.per_layer and row.path != ("wte",)]
    shards: list[list[tuple[TensorMap, int | None]]] = [[]]
    size = 0
    for row, layer in order:
        nbytes = int(np.prod(row.hf_shape(config))) * out_dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((row, layer))
        size += nbytes
    total = sum(int(np.prod(row.hf_shape(config))) for row, _ in order) * out_dtype.itemsize
    file_names = [
        f"model-{n:05d}-of-{len(shards):05d}.safetensors" for n in range(1, len(shards) + 1)
    ]
    weight_map = {
        row.hf_name.format(i=layer): file_name
        for file_name, shard in zip(file_names, shards, strict=True)
        for row, layer in shard
    }
    writing = files.output_directory(
        output, inputs=[our_dir], kind=hf_format.CHECKPOINT_OUTPUT, overwrite=overwrite
    )
    with writing as tmp, _progress(total, "jax_to_hf", progress) as bar:
        writers, jobs = [], []
        for file_name, shard in zip(file_names, shards, strict=True):
            writer = SafetensorsWriter(
                os.path.join(tmp, file_name),
                [
                    (row.hf_name.format(i=layer), out_dtype, row.hf_shape(config))
                    for row, layer in shard
                ],
            )
            writers.append(writer)
            jobs += [
                (
                    arrays[row.path],
                    row,
                    layer,
                    rows,
                    piece_config,
                    expert,
                    writer,
                    our_dir,
                    out_dtype,
                )
                for row, layer in shard
                for rows, piece_config, expert in pieces(row, config)
            ]
        try:
            _run(_export_piece, jobs, bar)
        except BaseException:
            for writer in writers:
                writer.discard()  # the partial directory is removed; keep the first error
            raise
        for writer in writers:
            writer.close()
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, hf_format.CONFIG_FILE), "w") as f:
            json.dump(hf_format.config_json(config), f, indent=2)
        with open(os.path.join(tmp, hf_format.GENERATION_CONFIG_FILE), "w") as f:
            json.dump(hf_format.generation_config_json(config), f, indent=2)
        _tokenizer_files(our_dir, tmp, config)
    return config
