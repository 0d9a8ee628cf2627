"""Safetensors files without torch: memory-mapped reading, one tensor at a time, and writing
front to back.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name to
`{"dtype", "shape", "data_offsets": [begin, end]}` (offsets into the data after the header), then
the raw bytes. Reading it directly lets bfloat16 come back as `ml_dtypes.bfloat16` numpy arrays
(the `safetensors` package's numpy loader rejects bf16) and never copies a tensor until asked.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Iterator

import ml_dtypes
import numpy as np

from dbrx_jax.io.files import member, read_json

DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
FLOAT_DTYPES = frozenset(
    DTYPES[name] for name in ("BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2")
)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsFile:
    """One `.safetensors` file: its header is parsed and checked against the file size on open."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path}: truncated safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise ValueError(
                    f"{self.path}: corrupt or truncated safetensors file (header "
                    f"length {header_len} for a {size}-byte file)"
                )
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{self.path}: corrupt safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        data_size = size - self._data_start
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(
                    f"{self.path}: tensor {name!r} has a bad header entry {entry!r} ({e!r})"
                ) from e
            if end - begin != int(np.prod(shape)) * dtype.itemsize or begin < 0:
                raise ValueError(
                    f"{self.path}: tensor {name!r}: offsets {begin}..{end} do not "
                    f"hold a {entry['dtype']}{list(shape)}"
                )
            if end > data_size:
                raise ValueError(
                    f"{self.path}: truncated: tensor {name!r} ends at byte "
                    f"{self._data_start + end}, the file has {size}"
                )
            self._entries[name] = (dtype, shape, begin, end)
        self._mmap: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        """A read-only view into the memory-mapped file (no copy until the caller makes one)."""
        dtype, shape, begin, end = self._entries[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mmap[self._data_start + begin : self._data_start + end]
        return raw.view(dtype).reshape(shape)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor, read with a plain file read (not the memory map, whose
        touched pages would count toward this process' resident memory)."""
        dtype, shape, _, _ = self._entries[name]
        return self.read_rows_into(name, start, np.empty((stop - start, *shape[1:]), dtype))

    def read_rows_into(self, name: str, start: int, out: np.ndarray) -> np.ndarray:
        """Rows [start, start + len(out)) of a tensor into the C-contiguous `out` (of the tensor's
        dtype), read straight into it: a reused `out` costs no allocation and no extra copy."""
        dtype, shape, begin, _ = self._entries[name]
        if out.dtype != dtype or out.shape[1:] != shape[1:] or not out.flags.c_contiguous:
            raise ValueError(
                f"{self.path}: tensor {name!r} is {dtype}{list(shape)}; cannot read its rows "
                f"into a {'' if out.flags.c_contiguous else 'non-contiguous '}"
                f"{out.dtype}{list(out.shape)} array"
            )
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        offset = self._data_start + begin + start * row_bytes
        if start + len(out) > shape[0]:
            raise ValueError(
                f"{self.path}: tensor {name!r} has no rows {start}..{start + len(out)}"
            )
        with open(self.path, "rb", buffering=0) as f:
            f.seek(offset)
            if read_into(f, out) != out.nbytes:
                raise ValueError(f"{self.path}: truncated while reading tensor {name!r}")
        return out


def read_into(f, out: np.ndarray) -> int:
    """Fills the C-contiguous `out` from the unbuffered file `f`'s position; the bytes read (fewer
    only at the end of the file)."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            break
        done += n
    return done


class SafetensorsCheckpoint:
    """A Hugging Face checkpoint directory: `model.safetensors`, or shards listed by
    `model.safetensors.index.json`. Maps tensor names to the file holding them."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"{self.directory}: not a directory")
        index_path = os.path.join(self.directory, INDEX_FILE)
        single_path = os.path.join(self.directory, SINGLE_FILE)
        if os.path.isfile(index_path):
            weight_map = read_json(index_path, "a safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise ValueError(
                    f"{index_path}: not a safetensors index (expected a 'weight_map' of "
                    "tensor names to file names)"
                )
            file_names = sorted(set(weight_map.values()))
        elif os.path.isfile(single_path):
            weight_map, file_names = None, [SINGLE_FILE]
        else:
            pickled = [
                n
                for n in os.listdir(self.directory)
                if n.endswith((".bin", ".pt", ".pth", ".ckpt"))
            ]
            if pickled:
                raise ValueError(
                    f"{self.directory}: holds only pickled checkpoints ({', '.join(pickled)}); "
                    "these are not read (unpickling runs arbitrary code). Re-save the model "
                    "as safetensors (transformers: save_pretrained(..., safe_serialization=True))."
                )
            raise FileNotFoundError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}")
        self.files: dict[str, SafetensorsFile] = {}
        for name in file_names:
            path = member(self.directory, name, index_path)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: listed in {INDEX_FILE} but missing")
            self.files[name] = SafetensorsFile(path)
        self.file_of: dict[str, str] = {}
        for file_name, st in self.files.items():
            for tensor in st.keys():
                if weight_map is not None and weight_map.get(tensor) != file_name:
                    raise ValueError(
                        f"{st.path}: holds tensor {tensor!r}, which {INDEX_FILE} "
                        f"places in {weight_map.get(tensor)!r}"
                    )
                self.file_of[tensor] = file_name
        if weight_map is not None:
            for tensor, file_name in weight_map.items():
                if tensor not in self.file_of:
                    raise ValueError(
                        f"{os.path.join(self.directory, file_name)}: tensor "
                        f"{tensor!r} is listed in {INDEX_FILE} but not in the file"
                    )

    def __iter__(self) -> Iterator[str]:
        return iter(self.file_of)

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def file(self, name: str) -> SafetensorsFile:
        """The file holding tensor `name`."""
        return self.files[self.file_of[name]]

    def path_of(self, name: str) -> str:
        return self.file(name).path

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file(name).shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self.file(name).dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self.file(name).get(name)


class SafetensorsWriter:
    """Writes one `.safetensors` file: the header (every tensor's name, dtype and shape, known in
    advance) first, then each tensor's bytes, possibly in row pieces: front to back in the
    header's order with `write`, or in place from any thread in any order with `write_rows`.
    Nothing is held in memory beyond the piece being written."""

    def __init__(
        self,
        path: str,
        tensors: list[tuple[str, np.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = path
        names = {np.dtype(v): k for k, v in DTYPES.items()}
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self._plan = []
        self._places: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        for name, dtype, shape in tensors:
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            header[name] = {
                "dtype": names[np.dtype(dtype)],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._plan.append((name, np.dtype(dtype), nbytes))
            self._places[name] = (np.dtype(dtype), tuple(shape), offset)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._data_start = 8 + len(raw)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._file.flush()  # write_rows writes around the buffered file object
        self._next = 0
        self._written = 0
        self._lock = threading.Lock()
        self._rows_written: dict[str, int] = {}  # write_rows: rows written per tensor

    def write(self, name: str, piece: np.ndarray) -> None:
        expected, dtype, nbytes = self._plan[self._next]
        if name != expected or piece.dtype != dtype:
            raise ValueError(
                f"{self.path}: expected {expected} ({dtype}) next, got {name} ({piece.dtype})"
            )
        np.ascontiguousarray(piece).tofile(self._file)
        self._written += piece.nbytes
        if self._written > nbytes:
            raise ValueError(f"{self.path}: too many bytes for {name}")
        if self._written == nbytes:
            self._next, self._written = self._next + 1, 0

    def write_rows(self, name: str, start: int, piece: np.ndarray) -> None:
        """Rows [start, start + len(piece)) of tensor `name` (the header's dtype, C-contiguous),
        written at their place in the file. Safe from several threads; not mixed with `write`."""
        if name not in self._places:
            raise ValueError(f"{self.path}: no tensor {name!r} in this file's header")
        dtype, shape, offset = self._places[name]
        if piece.dtype != dtype or piece.shape[1:] != shape[1:] or not piece.flags.c_contiguous:
            raise ValueError(
                f"{self.path}: tensor {name!r} is {dtype}{list(shape)}; got rows of a "
                f"{'' if piece.flags.c_contiguous else 'non-contiguous '}"
                f"{piece.dtype}{list(piece.shape)} array"
            )
        if start < 0 or start + len(piece) > shape[0]:
            raise ValueError(
                f"{self.path}: tensor {name!r} has no rows {start}..{start + len(piece)}"
            )
        with self._lock:
            self._rows_written[name] = self._rows_written.get(name, 0) + len(piece)
            if self._rows_written[name] > shape[0]:
                raise ValueError(f"{self.path}: too many rows written for {name}")
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        view = memoryview(piece.reshape(-1).view(np.uint8))
        position = self._data_start + offset + start * row_bytes
        while len(view):
            n = os.pwrite(self._file.fileno(), view, position)
            view, position = view[n:], position + n

    def close(self) -> None:
        if self._rows_written:
            short = [
                n
                for n, (_, shape, _) in self._places.items()
                if self._rows_written.get(n, 0) != (shape[0] if shape else 1)
            ]
            if short:
                raise ValueError(
                    f"{self.path}: {len(short)} tensors not fully written ({short[0]}, ...)"
                )
        elif self._next != len(self._plan):
            raise ValueError(f"{self.path}: {len(self._plan) - self._next} tensors not written")
        self._file.close()

    def discard(self) -> None:
        """Closes the file, complete or not (a failed write's output is about to be removed)."""
        self._file.close()
