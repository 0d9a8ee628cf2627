"""DbrxConfig: presets, validation, and the transformers config.json format both ways."""

import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from dbrx_jax import DbrxConfig
from dbrx_jax.config import PRESETS, dtype_name

# config.json of databricks/dbrx-instruct as released (the original remote-code format).
RELEASED_CONFIG_JSON = {
    "architectures": ["DbrxForCausalLM"],
    "attn_config": {"clip_qkv": 8, "kv_n_heads": 8, "model_type": "", "rope_theta": 500000},
    "auto_map": {
        "AutoConfig": "configuration_dbrx.DbrxConfig",
        "AutoModelForCausalLM": "modeling_dbrx.DbrxForCausalLM",
    },
    "d_model": 6144,
    "emb_pdrop": 0.0,
    "ffn_config": {
        "ffn_hidden_size": 10752,
        "model_type": "",
        "moe_jitter_eps": 0,
        "moe_loss_weight": 0.05,
        "moe_num_experts": 16,
        "moe_top_k": 4,
    },
    "initializer_range": 0.02,
    "max_seq_len": 32768,
    "model_type": "dbrx",
    "n_heads": 48,
    "n_layers": 40,
    "output_router_logits": False,
    "resid_pdrop": 0.0,
    "router_aux_loss_coef": 0.05,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.38.2",
    "use_cache": True,
    "vocab_size": 100352,
}
HF_FIELDS = (
    "d_model",
    "n_heads",
    "n_layers",
    "max_seq_len",
    "vocab_size",
    "kv_n_heads",
    "clip_qkv",
    "rope_theta",
    "ffn_hidden_size",
    "moe_num_experts",
    "moe_top_k",
    "moe_jitter_eps",
    "moe_loss_weight",
    "moe_normalize_expert_weights",
    "ffn_act_fn",
    "resid_pdrop",
    "emb_pdrop",
    "attn_pdrop",
    "initializer_range",
)


def _hf_fields(config):
    return {f: getattr(config, f) for f in HF_FIELDS}


def test_release_preset_counts():
    c = DbrxConfig.preset("dbrx-132b")
    assert c.num_params() == 131_596_523_520
    assert c.num_active_params() == 36_469_708_800
    assert (c.head_dim, c.n_kv_groups) == (128, 6)


def test_bench_preset_matches_performance_md():
    c = DbrxConfig.preset("dbrx-bench")
    assert (c.d_model, c.n_heads, c.kv_n_heads, c.ffn_hidden_size) == (2048, 16, 4, 3584)
    assert (c.moe_num_experts, c.moe_top_k, c.n_layers, c.vocab_size) == (16, 4, 8, 100352)
    assert round(c.num_params() / 1e9, 2) == 3.31


def test_released_config_json_reads_as_the_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASED_CONFIG_JSON))
    for source in (RELEASED_CONFIG_JSON, tmp_path, tmp_path / "config.json", str(tmp_path)):
        assert _hf_fields(DbrxConfig.from_hf(source)) == _hf_fields(PRESETS["dbrx-132b"])


def test_to_hf_round_trips_and_transformers_reads_it():
    for name, config in PRESETS.items():
        hf_dict = config.to_hf()
        assert (
            DbrxConfig.from_hf(hf_dict, dtype=config.dtype, param_dtype=config.param_dtype)
            == config
        ), name
        hf = transformers.DbrxConfig(**hf_dict)  # strict validation in transformers v5
        assert hf.rope_parameters["rope_theta"] == config.rope_theta
        assert hf.attn_config.kv_n_heads == config.kv_n_heads
        again = DbrxConfig.from_hf(hf.to_dict(), dtype=config.dtype, param_dtype=config.param_dtype)
        assert _hf_fields(again) == _hf_fields(config), name


def test_v5_rope_parameters_form():
    hf = RELEASED_CONFIG_JSON | {
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}
    }
    hf["attn_config"] = {k: v for k, v in hf["attn_config"].items() if k != "rope_theta"}
    assert DbrxConfig.from_hf(hf).rope_theta == 500000.0


def test_disagreeing_rope_thetas_load_what_transformers_computes(caplog):
    """What transformers 5 writes for a model built with attn_config={"rope_theta": 500000}: it
    also writes rope_parameters.rope_theta = 10000, and computes with that. We load the same
    base, and say in the log which one was chosen over which."""
    built = transformers.DbrxConfig(
        d_model=64, n_heads=4, attn_config={"rope_theta": 500000, "kv_n_heads": 2}
    )
    written = json.loads(built.to_json_string())
    assert written["attn_config"]["rope_theta"] == 500000
    with caplog.at_level(logging.WARNING):
        config = DbrxConfig.from_hf(written)
    assert config.rope_theta == built.rope_parameters["rope_theta"] == 10000.0
    assert any(
        "rope_parameters.rope_theta=10000.0 and attn_config.rope_theta=500000 disagree; using "
        "10000.0" in r.message
        for r in caplog.records
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "not a DBRX config"),
        ({"architectures": ["LlamaForCausalLM"]}, "not a DBRX config"),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
            "rope_type='yarn' is not supported",
        ),
        ({"ffn_config": {"ffn_act_fn": {"name": "tanh"}}}, "ffn_act_fn.*not supported"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"n_heads": 47}, "d_model=6144: expected a multiple of n_heads=47"),
        ({"attn_config": {"kv_n_heads": 5}}, "kv_n_heads=5: expected a divisor of n_heads=48"),
    ],
)
def test_bad_configs_are_refused_with_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        DbrxConfig.from_hf(RELEASED_CONFIG_JSON | change)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json: no such"):
        DbrxConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        DbrxConfig.from_hf(tmp_path)


def test_hf_defaults_apply_to_a_partial_config():
    c = DbrxConfig.from_hf({"model_type": "dbrx", "d_model": 64, "n_heads": 4})
    hf = transformers.DbrxConfig(d_model=64, n_heads=4)
    assert c.n_layers == hf.n_layers and c.ffn_hidden_size == hf.ffn_config.ffn_hidden_size
    assert c.moe_num_experts == hf.ffn_config.moe_num_experts
    assert c.rope_theta == hf.rope_parameters["rope_theta"] == 10000.0


def test_replace_and_knob_validation():
    c = DbrxConfig.preset("dbrx-tiny")
    assert c.replace(n_layers=3).n_layers == 3
    with pytest.raises(ValueError, match="unknown DbrxConfig field.*n_layer"):
        c.replace(n_layer=3)
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        c.replace(attention_impl="flash")
    with pytest.raises(ValueError, match="moe_impl='sparse': expected one of"):
        c.replace(moe_impl="sparse")
    with pytest.raises(ValueError, match="moe_gmm_impl='cutlass'"):
        c.replace(moe_gmm_impl="cutlass")
    with pytest.raises(ValueError, match="moe_capacity_factor=0"):
        c.replace(moe_capacity_factor=0)
    with pytest.raises(ValueError, match=r"\['gmm_impl'\] \(renamed: \['moe_gmm_impl'\]\)"):
        c.replace(gmm_impl="blocked")
    with pytest.raises(ValueError, match="unknown DBRX preset 'dbrx-huge'"):
        DbrxConfig.preset("dbrx-huge")
    assert DbrxConfig.from_json(c.to_json()) == c
    hash(c)  # usable as a static jit argument


@pytest.mark.parametrize(
    "spelling",
    ["bfloat16", "bf16", "BF16", jnp.bfloat16, np.dtype(jnp.bfloat16), "torch.bfloat16"],
    ids=str,
)
def test_every_dtype_spelling_is_accepted(spelling):
    assert dtype_name(spelling) == "bfloat16"
    config = DbrxConfig.preset("dbrx-tiny", dtype=spelling, param_dtype=spelling)
    assert config.dtype == config.param_dtype == "bfloat16"  # stored by name: still hashable
    assert config.compute_dtype == jnp.bfloat16
    hash(config)


def test_torch_dtypes_and_bad_dtypes():
    torch = pytest.importorskip("torch")
    assert dtype_name(torch.float32) == dtype_name(jnp.float32) == dtype_name(np.float32)
    with pytest.raises(ValueError, match=r"DbrxConfig.dtype: dtype 'int8': expected one of"):
        DbrxConfig.preset("dbrx-tiny", dtype="int8")
    with pytest.raises(ValueError, match="expected one of float32, bfloat16"):
        dtype_name(jnp.int32)


def test_old_knob_names_in_stored_configs_are_read():
    """Run configs and exports written before the MoE knobs got their moe_ prefix."""
    stored = json.loads(DbrxConfig.preset("dbrx-tiny", moe_gmm_impl="blocked").to_json())
    stored["gmm_impl"] = stored.pop("moe_gmm_impl")
    stored["capacity_factor"] = stored.pop("moe_capacity_factor")
    stored["router_z_loss_weight"] = stored.pop("moe_z_loss_weight")
    assert DbrxConfig.from_json(json.dumps(stored)) == DbrxConfig.preset(
        "dbrx-tiny", moe_gmm_impl="blocked"
    )
