"""The streaming converter: bitwise round trips, logits, input layouts, and refusals."""

import json
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import dbrx_jax
from benchmarks import hf_reference
from dbrx_jax import DbrxConfig, sharding
from dbrx_jax.io import convert, files
from dbrx_jax.io.safetensors import SafetensorsCheckpoint, SafetensorsWriter
from tests import helpers

CONFIG = DbrxConfig.preset("dbrx-tiny", vocab_size=128, n_layers=2)
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 9)), jnp.int32)


def _tensors(directory):
    ckpt = SafetensorsCheckpoint(directory)
    return {name: np.array(ckpt.get(name)) for name in ckpt}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shard", ["single", "sharded"])
def test_round_trip_is_bitwise_and_transformers_loads_it(tmp_path, dtype, shard):
    model = hf_reference.hf_model(CONFIG, seed=7).to(dtype)
    model.save_pretrained(
        tmp_path / "hf", **({"max_shard_size": "150KB"} if shard == "sharded" else {})
    )
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")  # carried along both ways
    convert.hf_to_jax(str(tmp_path / "hf"), str(tmp_path / "ours"), progress=False)
    convert.jax_to_hf(
        str(tmp_path / "ours"), str(tmp_path / "back"), progress=False, shard_bytes=100_000
    )
    original, back = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert original.keys() == back.keys()
    for name, value in original.items():
        assert back[name].dtype == value.dtype
        np.testing.assert_array_equal(back[name].view(np.uint8), value.view(np.uint8), err_msg=name)
    assert (tmp_path / "back" / "tokenizer.json").exists()
    assert len(list((tmp_path / "back").glob("model-*.safetensors"))) > 1
    generation = json.loads((tmp_path / "back" / "generation_config.json").read_text())
    assert generation == {}  # the tiny preset sets no token ids
    # Both loaded the same way (a model moved with .to(bf16) also rounds RoPE's inv_freq).
    logits = []
    for directory in (tmp_path / "hf", tmp_path / "back"):
        loaded = transformers.DbrxForCausalLM.from_pretrained(
            directory, dtype=dtype, attn_implementation="sdpa"
        ).eval()
        with torch.no_grad():
            hf_reference.without_clip_crash(loaded)
            ids = torch.as_tensor(np.asarray(TOKENS), dtype=torch.long)
            logits.append(loaded(ids).logits.float().numpy())
    np.testing.assert_array_equal(logits[1], logits[0])


@pytest.mark.slow
def test_converted_model_gives_the_same_logits(tmp_path):
    """Bitwise the logits of loading the HF directory directly, which test_hf_parity.py holds
    to transformers' (float64 to 1e-9; float32 within 3x transformers' own error)."""
    model = hf_reference.hf_model(CONFIG, seed=8)
    model.save_pretrained(tmp_path / "hf")
    convert.hf_to_jax(str(tmp_path / "hf"), str(tmp_path / "ours"), progress=False)
    ours = dbrx_jax.from_pretrained(tmp_path / "ours")
    direct = dbrx_jax.from_pretrained(tmp_path / "hf")
    np.testing.assert_array_equal(ours(TOKENS).logits, direct(TOKENS).logits)
    reference, _ = hf_reference.run(model, np.asarray(TOKENS))
    scale = np.abs(reference).max()
    assert np.abs(np.asarray(ours(TOKENS).logits) - reference).max() <= 1e-3 * scale


def test_float32_and_bfloat16_outputs(tmp_path):
    hf_reference.hf_model(CONFIG, seed=9).save_pretrained(tmp_path / "hf")
    config = convert.hf_to_jax(
        str(tmp_path / "hf"), str(tmp_path / "bf16"), dtype="bfloat16", progress=False
    )
    assert config.param_dtype == "bfloat16"
    model = dbrx_jax.from_pretrained(tmp_path / "bf16")
    assert model.wte[...].dtype == jnp.bfloat16
    convert.jax_to_hf(
        str(tmp_path / "bf16"), str(tmp_path / "back32"), dtype="float32", progress=False
    )
    back = _tensors(tmp_path / "back32")
    original = _tensors(tmp_path / "hf")
    name = "transformer.blocks.1.ffn.experts.mlp.w2"
    np.testing.assert_array_equal(
        back[name], original[name].astype(jnp.bfloat16).astype(np.float32)
    )


def test_orbax_metadata_describes_the_streamed_arrays(tmp_path):
    """hf_to_jax lets Orbax write the checkpoint's metadata for placeholders, streams the real
    arrays in with their own chunking, then rewrites the recorded write/chunk shapes: Orbax's
    own reading of the export must then agree with the zarr arrays on disk, and restore it onto
    a mesh. (If an Orbax release moves those metadata files, this fails first.)"""
    import orbax.checkpoint as ocp

    hf_reference.hf_model(CONFIG, seed=3).save_pretrained(tmp_path / "hf")
    convert.hf_to_jax(
        str(tmp_path / "hf"), str(tmp_path / "ours"), progress=False, mesh_sizes={"expert": 4}
    )
    params_dir = tmp_path / "ours" / "params"
    metadata = ocp.StandardCheckpointer().metadata(params_dir).item_metadata
    for path, array in jax.tree_util.tree_leaves_with_path(metadata):
        name = ".".join(k.key for k in path)
        zarray = json.loads((params_dir / name / ".zarray").read_text())
        assert list(array.shape) == zarray["shape"], name
        assert list(array.storage.chunk_shape) == zarray["chunks"], name
        assert list(array.storage.write_shape) == zarray["chunks"], name
    assert metadata["blocks"]["ffn"]["w1"]["value"].storage.chunk_shape == (1, 4, 64, 96)
    mesh = sharding.make_mesh({"fsdp": 2, "expert": 4})
    model = dbrx_jax.from_pretrained(tmp_path / "ours", mesh=mesh)
    w1 = model.blocks.ffn.w1[...]
    assert w1.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", None)
    np.testing.assert_array_equal(w1, dbrx_jax.from_pretrained(tmp_path / "hf").blocks.ffn.w1[...])


@pytest.fixture
def hf_dir(tmp_path):
    hf_reference.hf_model(CONFIG, seed=10).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _write(directory, tensors, config_from):
    os.makedirs(directory, exist_ok=True)
    shutil.copy(config_from / "config.json", directory)
    safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"))
    return directory


def _refused(source, output, match, **kwargs):
    with pytest.raises((ValueError, FileNotFoundError, FileExistsError), match=match):
        convert.hf_to_jax(str(source), str(output), progress=False, **kwargs)
    leftovers = [p for p in os.listdir(output.parent) if p.startswith(output.name)]
    assert leftovers == [] or kwargs.get("overwrite") is False


def test_bad_inputs_are_refused_and_leave_nothing(hf_dir, tmp_path):
    out = tmp_path / "out"
    tensors = _tensors(hf_dir)
    missing = dict(tensors)
    del missing["transformer.blocks.0.ffn.experts.mlp.w2"]
    _refused(
        _write(tmp_path / "missing", missing, hf_dir),
        out,
        r"missing tensor 'transformer.blocks.0.ffn.experts.mlp.w2'.*\[1536, 64\]",
    )
    extra = dict(tensors, **{"transformer.blocks.0.extra.weight": np.ones(3, np.float32)})
    _refused(_write(tmp_path / "extra", extra, hf_dir), out, r"unexpected tensor")
    misshapen = dict(tensors, **{"lm_head.weight": np.ones((128, 32), np.float32)})
    _refused(
        _write(tmp_path / "shape", misshapen, hf_dir),
        out,
        r"model.safetensors: tensor 'lm_head.weight' has shape \[128, 32\], expected",
    )
    truncated = tmp_path / "truncated"
    shutil.copytree(hf_dir, truncated)
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(truncated / "model.safetensors") // 2)
    _refused(truncated, out, r"model.safetensors: truncated")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(hf_dir / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80")
    _refused(pickled, out, r"pickled checkpoints")
    llama = tmp_path / "llama"
    shutil.copytree(hf_dir, llama)
    cfg = json.loads((llama / "config.json").read_text()) | {"model_type": "llama"}
    (llama / "config.json").write_text(json.dumps(cfg))
    _refused(llama, out, r"not a DBRX config")
    inv_freq = dict(
        tensors,
        **{"transformer.blocks.0.norm_attn_norm.attn.rotary_emb.inv_freq": np.ones(8, np.float32)},
    )
    convert.hf_to_jax(str(_write(tmp_path / "inv", inv_freq, hf_dir)), str(out), progress=False)
    assert os.listdir(tmp_path).count("out") == 1


def test_existing_output_needs_overwrite_and_survives_a_failure(hf_dir, tmp_path):
    out = tmp_path / "out"
    convert.hf_to_jax(str(hf_dir), str(out), progress=False)
    with pytest.raises(FileExistsError, match="exists; pass --overwrite"):
        convert.hf_to_jax(str(hf_dir), str(out), progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError):
        convert.hf_to_jax(str(broken), str(out), progress=False, overwrite=True)
    assert dbrx_jax.from_pretrained(out)(TOKENS).logits.shape == (2, 9, 128)  # still intact
    assert sorted(os.listdir(tmp_path)) == ["broken", "hf", "out"]  # no temporary leftovers


@pytest.mark.slow
def test_command_line(hf_dir, tmp_path):
    result = helpers.run(
        "experiments/convert.py",
        "--direction=hf_to_jax",
        f"--input={hf_dir}",
        f"--output={tmp_path / 'ours'}",
        "--mesh=expert=4",
        timeout=300,
    )
    assert "peak RSS" in result.stdout
    chunks = json.loads(
        (tmp_path / "ours" / "params" / "blocks.ffn.w1.value" / ".zarray").read_text()
    )["chunks"]
    assert chunks == [1, 4, 64, 96]  # one layer, the 4 experts one device of expert=4 holds


# The fast paths against the plain ones: numpy layouts in tiles, chunk files written and read
# directly, safetensors rows written in place out of order.


def _random_bits(shape, dtype, seed=0):
    bits = np.random.default_rng(seed).integers(0, 2**16, shape, dtype=np.uint16)
    return bits.view(dtype)  # every bf16 bit pattern, NaN payloads included


@pytest.mark.parametrize("shape", [(300, 700), (1, 513, 257), (256, 256)])
def test_tiled_copy_is_numpys_copy(shape):
    source = _random_bits(shape, jnp.bfloat16)
    view = source.T if source.ndim == 2 else source.transpose(0, 2, 1)
    out = np.empty(view.shape, view.dtype)
    convert._copy_tiled(out, view)
    np.testing.assert_array_equal(out.view(np.uint16), np.ascontiguousarray(view).view(np.uint16))


def test_every_layout_is_bitwise_the_plain_one():
    """convert._layout (numpy views, tiled copies into reused buffers) against the layouts done
    the simple way, both directions, for every tensor's piece."""
    for row in convert.TENSOR_MAPS:
        for rows, piece_config, _ in convert.pieces(row, CONFIG)[:2]:
            hf = _random_bits(row.hf_shape(CONFIG), jnp.bfloat16)[rows]
            ours = convert._layout(row.to_ours, hf, piece_config)
            expected = np.ascontiguousarray(row.to_ours(hf.view(np.uint16), piece_config))
            np.testing.assert_array_equal(ours.view(np.uint16), expected, err_msg=row.hf_name)
            back = convert._layout(row.to_hf, np.ascontiguousarray(ours), piece_config)
            np.testing.assert_array_equal(back.view(np.uint16), hf.view(np.uint16))


@pytest.mark.parametrize(
    "chunks",
    [(1, 1, 6, 10), (1, 1, 2, 10), (1, 1, 6, 5), (1, 1, 3, 5), (1, 2, 6, 10), (1, 1, 4, 10)],
)
def test_chunk_files_are_what_tensorstore_writes_and_reads(tmp_path, chunks):
    """Pieces of one (layer, expert) written as chunk files (one chunk, several along rows or
    columns) or through tensorstore (chunks not inside one piece, or not dividing it) give the
    same files, and read back the same."""
    shape, dtype = (2, 2, 6, 10), np.dtype(jnp.bfloat16)
    value = _random_bits(shape, dtype, seed=1)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir(), theirs.mkdir()
    array = convert._ZarrArray.create(str(ours), shape, chunks, dtype)
    reference = convert._ZarrArray.create(str(theirs), shape, chunks, dtype).store
    for index in np.ndindex(shape[:2]):
        array.write(index, value[index])
        reference[index].write(value[index]).result()
    assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs))
    for name in os.listdir(theirs):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    for index in np.ndindex(shape[:2]):
        got = array.read(index, "test")
        np.testing.assert_array_equal(got.view(np.uint16), value[index].view(np.uint16))


def test_rows_written_in_place_make_the_same_file(tmp_path):
    tensors = {"a": _random_bits((6, 4), jnp.bfloat16), "b": _random_bits((3,), jnp.bfloat16, 2)}
    plan = [(name, value.dtype, value.shape) for name, value in tensors.items()]
    in_order = SafetensorsWriter(str(tmp_path / "in_order.safetensors"), plan)
    for name, value in tensors.items():
        in_order.write(name, value)
    in_order.close()
    in_place = SafetensorsWriter(str(tmp_path / "in_place.safetensors"), plan)
    for name, start, stop in [("b", 0, 3), ("a", 4, 6), ("a", 0, 4)]:
        in_place.write_rows(name, start, tensors[name][start:stop])
    in_place.close()
    assert (tmp_path / "in_place.safetensors").read_bytes() == (
        tmp_path / "in_order.safetensors"
    ).read_bytes()
    short = SafetensorsWriter(str(tmp_path / "short.safetensors"), plan)
    short.write_rows("a", 0, tensors["a"][:2])
    with pytest.raises(ValueError, match="short.safetensors: 2 tensors not fully written"):
        short.close()


def test_a_failed_piece_cancels_the_queued_ones_and_waits_for_the_running():
    """Nothing writes into the output after convert._run returns, and a failure does not go on
    converting the rest of the model."""
    started, ended = [], []

    def piece(i, bar):
        started.append(i)
        if i == 0:
            raise OSError("disk full")
        time.sleep(0.3)
        ended.append(i)

    with pytest.raises(OSError, match="disk full"):
        convert._run(piece, [(i,) for i in range(50)], bar=None)
    assert sorted(ended) == sorted(started[1:])  # every piece that started has ended
    assert len(started) <= convert.WORKERS + 1  # the failed piece, then one more per worker


def test_a_second_sigterm_still_waits_for_the_running_pieces():
    """A stop that arrives while a failed conversion waits for its running pieces (a second
    SIGTERM) does not cut the wait short: the output directory is removed only after them."""
    ended = []

    def piece(i, bar):
        if i == 0:
            raise OSError("disk full")
        if i == 1:
            time.sleep(0.1)  # the main thread is waiting for this piece by now
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.3)
        ended.append(i)

    previous = signal.signal(signal.SIGTERM, lambda *_: files.request_termination())
    try:
        with pytest.raises(SystemExit) as stop:
            convert._run(piece, [(i,) for i in range(50)], bar=None)
    finally:
        signal.signal(signal.SIGTERM, previous)
        files.TERMINATING.clear()
    assert stop.value.code == 143
    assert 1 in ended
