"""`from_pretrained`: file layouts it reads, and the clear errors for what it must not read."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import dbrx_jax
from benchmarks import hf_reference
from dbrx_jax import DbrxConfig
from dbrx_jax.io.hf_format import TENSOR_MAPS
from dbrx_jax.io.pretrained import hf_state_dict
from dbrx_jax.io.safetensors import SafetensorsCheckpoint

CONFIG = DbrxConfig.preset("dbrx-tiny", vocab_size=128, n_layers=2)
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 9)), jnp.int32)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    hf_reference.hf_model(CONFIG, seed=4).save_pretrained(path)
    return path


def _tensors(hf_dir) -> dict[str, np.ndarray]:
    ckpt = SafetensorsCheckpoint(hf_dir)
    return {name: np.array(ckpt.get(name)) for name in ckpt}


def _write(path, tensors, config_from):
    os.makedirs(path, exist_ok=True)
    shutil.copy(os.path.join(config_from, "config.json"), path)
    safetensors.numpy.save_file(tensors, os.path.join(path, "model.safetensors"))
    return path


def test_every_tensor_round_trips_through_our_layout(hf_dir):
    """HF -> ours -> HF is the identity on every tensor (w2's un-transposed layout included)."""
    original = _tensors(hf_dir)
    exported = hf_state_dict(dbrx_jax.from_pretrained(hf_dir))
    assert exported.keys() == original.keys()
    for name, value in original.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    assert len(original) == 3 + 8 * CONFIG.n_layers == len(TENSOR_MAPS) + 8 * (CONFIG.n_layers - 1)


def test_sharded_checkpoint_equals_single_file(hf_dir, tmp_path):
    sharded = tmp_path / "sharded"
    hf_reference.hf_model(CONFIG, seed=4).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    single = dbrx_jax.from_pretrained(hf_dir)(TOKENS).logits
    np.testing.assert_array_equal(dbrx_jax.from_pretrained(sharded)(TOKENS).logits, single)


def test_bfloat16_checkpoint(hf_dir, tmp_path):
    import torch

    hf_reference.hf_model(CONFIG, seed=4).to(torch.bfloat16).save_pretrained(tmp_path)
    model = dbrx_jax.from_pretrained(tmp_path)  # dtype from config.json
    assert model.config.dtype == "bfloat16" and model.wte[...].dtype == jnp.bfloat16
    ours32 = dbrx_jax.from_pretrained(tmp_path, dtype="float32")
    expected = _tensors(hf_dir)["transformer.wte.weight"].astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(ours32.wte[...]), expected)


def test_rotary_inv_freq_is_ignored(hf_dir, tmp_path):
    tensors = _tensors(hf_dir)
    tensors["transformer.blocks.0.norm_attn_norm.attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    model = dbrx_jax.from_pretrained(_write(tmp_path, tensors, hf_dir))
    np.testing.assert_array_equal(
        model(TOKENS).logits, dbrx_jax.from_pretrained(hf_dir)(TOKENS).logits
    )


def test_missing_tensor_is_named(hf_dir, tmp_path):
    tensors = _tensors(hf_dir)
    del tensors["transformer.blocks.1.ffn.experts.mlp.v1"]
    with pytest.raises(
        ValueError,
        match=r"missing tensor 'transformer.blocks.1.ffn.experts.mlp.v1'"
        r".*\[1536, 64\]",
    ):
        dbrx_jax.from_pretrained(_write(tmp_path, tensors, hf_dir))


def test_unexpected_tensor_is_named_with_its_file(hf_dir, tmp_path):
    tensors = _tensors(hf_dir)
    tensors["transformer.blocks.2.ffn.router.layer.weight"] = np.zeros((16, 64), np.float32)
    with pytest.raises(
        ValueError,
        match=r"model.safetensors: unexpected tensor "
        r"'transformer.blocks.2.ffn.router.layer.weight'",
    ):
        dbrx_jax.from_pretrained(_write(tmp_path, tensors, hf_dir))


def test_wrong_shape_is_named_with_file_and_expected_shape(hf_dir, tmp_path):
    tensors = _tensors(hf_dir)
    name = "transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight"
    tensors[name] = tensors[name][:, :32].copy()
    with pytest.raises(
        ValueError,
        match=r"model.safetensors: tensor '.*Wqkv.weight' has shape "
        r"\[128, 32\], expected \[128, 64\]",
    ):
        dbrx_jax.from_pretrained(_write(tmp_path, tensors, hf_dir))


def test_truncated_shard_is_named(hf_dir, tmp_path):
    shutil.copytree(hf_dir, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(ValueError, match=r"model.safetensors: truncated"):
        dbrx_jax.from_pretrained(tmp_path)


def test_corrupt_header_is_named(hf_dir, tmp_path):
    shutil.copytree(hf_dir, tmp_path, dirs_exist_ok=True)
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage")
    with pytest.raises(ValueError, match=r"model.safetensors: corrupt safetensors header"):
        dbrx_jax.from_pretrained(tmp_path)


def test_pickled_checkpoints_are_refused(hf_dir, tmp_path):
    shutil.copy(hf_dir / "config.json", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"pytorch_model.bin.*not read"):
        dbrx_jax.from_pretrained(tmp_path)


def test_non_dbrx_config_is_refused(hf_dir, tmp_path):
    shutil.copytree(hf_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: not a DBRX config"):
        dbrx_jax.from_pretrained(tmp_path)


def test_index_naming_a_missing_shard(hf_dir, tmp_path):
    hf_reference.hf_model(CONFIG, seed=4).save_pretrained(tmp_path, max_shard_size="100KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"{victim.name}: listed in"):
        dbrx_jax.from_pretrained(tmp_path)


def test_integer_tensor_is_refused(hf_dir, tmp_path):
    tensors = _tensors(hf_dir)
    tensors["transformer.norm_f.weight"] = np.ones(64, np.int32)
    with pytest.raises(ValueError, match=r"'transformer.norm_f.weight' has dtype int32, expected"):
        dbrx_jax.from_pretrained(_write(tmp_path, tensors, hf_dir))
