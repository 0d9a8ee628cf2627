"""LoRA (dbrx_jax/lora.py): adapters on every weight, routed experts included, through every
MoE dispatch path and expert parallelism; only the adapters train."""

import functools
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

from benchmarks import hf_reference
from dbrx_jax import (
    Dbrx,
    DbrxConfig,
    data,
    experiment,
    from_pretrained,
    memory,
    optim,
    quant,
    sharding,
    state,
    train,
)
from dbrx_jax.config import LORA_TARGETS
from dbrx_jax.io import checkpoint, convert

TINY = DbrxConfig.preset("dbrx-tiny", vocab_size=128)
ALL = "attn.*,ffn.*"
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 12)), jnp.int32)
# Every weight's adapter product A B, written out per target (stacked layers L first).
PRODUCTS = {
    "attn.wqkv": "LDr,LrKJH->LDKJH",
    "attn.out": "LNHr,LrD->LNHD",
    "ffn.router": "LDr,LrE->LDE",
    "ffn.w1": "LEDr,LErF->LEDF",
    "ffn.v1": "LEDr,LErF->LEDF",
    "ffn.w2": "LEFr,LErD->LEFD",
}
DISPATCHES = ["dense", "gather", "dropless", "capacity"]
# HLO ops that hand an array on without computing one (a loop's inputs, say).
PASSED_ALONG = {"parameter", "get-tuple-element", "tuple", "bitcast", "copy"}


def _config(impl="dropless", **changes):
    # capacity_factor 8: nothing is dropped, so the capacity path is exact too
    return TINY.replace(moe_impl=impl, moe_capacity_factor=8.0, **changes)


@functools.cache
def _weights(targets: str, random_b: bool):
    """The states of a base model (seed 0) and of the same base with rank-4 adapters (A from
    seed 1; B random unless `random_b` is False: fresh adapters), built once."""
    base = Dbrx(_config(), rngs=nnx.Rngs(0))
    config = _config(lora_rank=4, lora_alpha=8.0, lora_targets=targets)
    adapted = Dbrx(config, rngs=nnx.Rngs(1))
    nnx.update(adapted, nnx.state(base, nnx.Param))
    if random_b:
        rng = np.random.RandomState(2)
        for _, v in nnx.to_flat_state(nnx.state(adapted, nnx.LoRAParam)):
            v.set_value(jnp.asarray(0.1 * rng.standard_normal(v.shape), v.dtype))
    return nnx.state(base), nnx.state(adapted)


def _build(config, weights, mesh=None):
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Dbrx(config, rngs=nnx.Rngs(0), mesh=mesh)))
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, weights))


def _adapted(impl="dropless", targets=ALL, random_b=True, **changes):
    """`_weights` as models running `impl` (and any other config `changes`)."""
    base, adapted = _weights(targets, random_b)
    config = _config(impl, lora_rank=4, lora_alpha=8.0, lora_targets=targets, **changes)
    return _build(_config(impl, **changes), base), _build(config, adapted)


@nnx.jit
def _logits(model):
    return model(TOKENS).logits


def _loss(model):
    logits = model(TOKENS).logits.astype(jnp.float32)
    probe = jax.random.normal(jax.random.key(7), logits.shape, jnp.float32)
    return jnp.sum(logits * probe) / logits.size


def _adapter_grads(model):
    graphdef, adapters, frozen = state.split_trainable(model)
    return jax.jit(jax.grad(lambda a: _loss(nnx.merge(graphdef, a, *frozen))))(adapters)


def _by_target(adapters) -> dict[str, dict[str, np.ndarray]]:
    """{"ffn.w1": {"a": ..., "b": ...}, ...} from an adapter state."""
    out = {}
    for path, v in nnx.to_flat_state(adapters):
        module, attr, which = (str(p) for p in path[-3:])
        out.setdefault(f"{module}.{attr.removesuffix('_lora')}", {})[which] = np.asarray(v[...])
    return out


@pytest.mark.parametrize("impl", DISPATCHES)
def test_fresh_adapters_leave_the_model_exactly_as_it_was(impl):
    base, adapted = _adapted(impl, random_b=False)
    assert set(_by_target(nnx.state(adapted, nnx.LoRAParam))) == set(LORA_TARGETS)
    np.testing.assert_array_equal(_logits(adapted), _logits(base))


def test_targets_are_patterns_and_unknown_ones_are_refused():
    _, adapted = _adapted(targets="ffn.w*", random_b=False)
    assert set(_by_target(nnx.state(adapted, nnx.LoRAParam))) == {"ffn.w1", "ffn.w2"}
    with pytest.raises(ValueError, match="lora_targets='attn.qkv'.*matches no adaptable"):
        TINY.replace(lora_rank=4, lora_targets="attn.qkv")
    with pytest.raises(ValueError, match="lora_rank=-1"):
        TINY.replace(lora_rank=-1)


@pytest.fixture(scope="module")
def float64_reference():
    """Float64 gradients of the adapters (the weights of `_adapted`), through the base model on
    the dense path with `W + s A B` merged in by the einsums in PRODUCTS: no LoRA code."""
    with jax.enable_x64(True):
        _, adapted = _adapted("dense")
        reference_model = Dbrx(
            _config("dense", dtype="float64", param_dtype="float64"), rngs=nnx.Rngs(0)
        )
        graphdef, _ = nnx.split(reference_model, nnx.Param)
        flat_base = dict(nnx.to_flat_state(nnx.state(reference_model, nnx.Param)))
        for path, v in nnx.to_flat_state(nnx.state(adapted, nnx.Param)):
            if not isinstance(v, nnx.LoRAParam):
                flat_base[path].set_value(np.asarray(v[...], np.float64))
        adapters64 = {
            t: {k: jnp.asarray(x, jnp.float64) for k, x in ab.items()}
            for t, ab in _by_target(nnx.state(adapted, nnx.LoRAParam)).items()
        }
        scale = 8.0 / 4

        def merged_loss(adapters):
            flat = {}
            for path, v in flat_base.items():
                name = ".".join(str(p) for p in path[-2:])
                w = v[...]
                if name in adapters:
                    ab = adapters[name]
                    delta = jnp.einsum(PRODUCTS[name], ab["a"], ab["b"]).reshape(w.shape)
                    w = w + scale * delta
                flat[path] = v.replace(w)
            return _loss(nnx.merge(graphdef, nnx.from_flat_state(list(flat.items()))))

        grads = jax.jit(jax.grad(merged_loss))(adapters64)
        return jax.tree.map(np.asarray, grads)


def _assert_close_to(reference, ours, what):
    for target, ab in reference.items():
        for which, expected in ab.items():
            scale_of = float(np.abs(expected).max())
            assert scale_of > 0, (target, which)
            np.testing.assert_allclose(
                ours[target][which],
                expected,
                rtol=0,
                atol=2e-5 * scale_of,
                err_msg=f"{target}.{which} ({what})",
            )


@pytest.mark.slow
@pytest.mark.parametrize("impl", DISPATCHES)
def test_adapter_gradients_match_a_float64_merged_reference(impl, float64_reference):
    """Our adapted model's gradients (fp32, this dispatch path, the low-rank terms by the
    path's own matmuls) against `float64_reference`, for every target."""
    _, adapted = _adapted(impl)
    _assert_close_to(float64_reference, _by_target(_adapter_grads(adapted)), impl)


@pytest.mark.slow
def test_adapters_under_expert_parallelism_equal_one_device(float64_reference):
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "expert": 4})
    for exchange in ("all_gather", "all_to_all"):
        _, single = _adapted("dropless", moe_exchange=exchange)
        sharded = single.on_mesh(mesh)
        assert sharded.plan.expert_parallel
        np.testing.assert_allclose(_logits(sharded), _logits(single), atol=2e-5)
        _assert_close_to(float64_reference, _by_target(_adapter_grads(sharded)), exchange)


def test_merged_equals_unmerged():
    _, adapted = _adapted("dropless")
    merged = adapted.merge_lora()
    assert merged.config.lora_rank == 0 and not nnx.state(merged, nnx.LoRAParam)
    np.testing.assert_allclose(_logits(merged), _logits(adapted), atol=2e-6)


def _train_step_program(lora_rank: int):
    config = TINY.replace(lora_rank=lora_rank, lora_targets=ALL)
    mesh = sharding.make_mesh({"data": 8})
    tx = optax.adamw(1e-2)
    graphdef, params, opt_state, frozen = state.init_train_state(config, tx, mesh)
    return graphdef, params, opt_state, frozen, train.make_train_step(graphdef, tx), mesh


def _batch(mesh):
    tokens = np.random.RandomState(1).randint(0, 128, (8, 17))
    return sharding.shard_batch(data.model_batch(tokens), mesh)


@pytest.mark.slow
def test_only_the_adapters_train_and_the_base_stays_bitwise_unchanged():
    _, params, opt_state, frozen, step, mesh = _train_step_program(4)
    assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(params))
    adapter_shapes = {tuple(v.shape) for _, v in nnx.to_flat_state(params)}
    opt_shapes = {tuple(x.shape) for x in jax.tree.leaves(opt_state) if np.ndim(x) > 0}
    assert opt_shapes <= adapter_shapes  # the optimizer state holds adapter leaves only
    before = jax.tree.map(np.array, frozen)
    batch = _batch(mesh)
    losses = []
    for _ in range(3):
        params, opt_state, metrics = step(params, opt_state, batch, None, frozen)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, frozen), before)


@pytest.mark.slow
def test_the_compiled_step_computes_no_gradient_for_the_frozen_base():
    """Every expert weight stack `[L, E, D, F]` in the compiled LoRA step is the base's input
    (no gradient buffer of that shape is made); the full fine-tuning step makes some."""

    def expert_stacks(lora_rank):
        _, params, opt_state, frozen, step, mesh = _train_step_program(lora_rank)
        hlo = step.lower(params, opt_state, _batch(mesh), None, frozen).compile().as_text()
        c = TINY
        shard = f"f32[{c.n_layers},{c.moe_num_experts},{c.d_model},{c.ffn_hidden_size}]"
        made = re.findall(rf"= {re.escape(shard)}\S* ([a-z-]+)\(", hlo)
        return [op for op in made if op not in PASSED_ALONG]

    assert expert_stacks(4) == []
    assert expert_stacks(0)  # the check can see gradient buffers where there are some


def _lora_run_config(**changes):
    """configs/tiny.py as a LoRA run on its fresh base: rank 4 on every weight, 4 steps,
    checkpoints at 2 and 4."""
    config = experiment.base_config()
    config.model = experiment.model_section("dbrx-tiny", lora_rank=4, lora_targets=ALL)
    config.data.spm_vocab_size = 1024
    config.batch_size, config.seq_len, config.warmup_steps = 8, 32, 0
    config.total_steps, config.checkpoint_every_steps = 4, 2
    config.eval_every_steps, config.log_every_steps = 0, 1
    config.learning_rate = 1e-2
    for key, value in changes.items():
        config[key] = value
    return config


@pytest.mark.slow
def test_a_lora_run_checkpoints_adapters_alone_resumes_exactly_and_exports_for_transformers(
    tmp_path,
):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.train(_lora_run_config(), str(straight), progress=False)
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")  # as if stopped after step 2's save
    summary = train.train(_lora_run_config(), str(resumed), progress=False)
    assert summary["loss_curve"][0][0] == 3  # resumed from step 2
    run = state.RunConfig.read(str(straight))
    tx = optim.make_optimizer(run.experiment)
    mesh = sharding.make_mesh({"data": -1})
    _, params, opt_state, _ = state.abstract_train_state(run.model, tx, mesh)
    assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(params))
    trees = {}
    for name, workdir in (("straight", straight), ("resumed", resumed)):
        checkpointer = checkpoint.Checkpointer(str(workdir / "checkpoints"))
        trees[name] = checkpointer.restore_state(4, {"params": params, "opt_state": opt_state})
        checkpointer.close()
    jax.tree.map(np.testing.assert_array_equal, trees["straight"], trees["resumed"])
    # the checkpoint is the adapters: a few percent of the model
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(trees["straight"]["params"]))
    assert adapter_bytes < 0.2 * run.model.replace(lora_rank=0).num_params() * 4

    with pytest.raises(ValueError, match="--merge_lora"):
        state.export_from_workdir(str(straight), str(tmp_path / "export"))
    state.export_from_workdir(str(straight), str(tmp_path / "export"), merge_lora=True)
    exported = from_pretrained(str(tmp_path / "export"))
    assert exported.config.lora_rank == 0
    adapted = state.load_adapted(str(straight))  # the run's adapters on its own base
    jax.tree.map(
        np.testing.assert_array_equal,
        nnx.state(adapted, nnx.LoRAParam),
        trees["straight"]["params"],
    )
    tokens = TOKENS % exported.config.vocab_size
    ours = np.asarray(exported(tokens).logits)
    np.testing.assert_allclose(ours, adapted(tokens).logits, atol=2e-5)
    # and transformers reads the merged model through the converter
    convert.jax_to_hf(str(tmp_path / "export"), str(tmp_path / "hf"), progress=False)
    loaded = transformers.DbrxForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        hf_reference.without_clip_crash(loaded)
        reference = loaded(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=1e-4)


def test_the_memory_plan_puts_dbrx_132b_qlora_on_one_h200_and_lora_on_eight_80gb_gpus():
    config = DbrxConfig.preset(
        "dbrx-132b", lora_rank=16, lora_targets=ALL, param_dtype="bfloat16", dtype="bfloat16"
    )
    h200, h100 = 141e9 / 2**30, 80e9 / 2**30
    qlora = memory.lora_memory_per_device(config, {"data": 1}, base_bits=4)
    assert 60 < qlora["base_gib"] < 75 and qlora["total_gib"] < 0.7 * h200
    int8 = memory.lora_memory_per_device(config, {"data": 1}, base_bits=8)
    assert int8["base_gib"] > 1.8 * qlora["base_gib"]
    lora = memory.lora_memory_per_device(config, {"fsdp": 8})
    assert lora["total_gib"] < 0.5 * h100
    with pytest.raises(ValueError, match="base_bits=3"):
        memory.lora_memory_per_device(config, {"data": 1}, base_bits=3)


@pytest.mark.slow
@pytest.mark.parametrize("bits, group", [(8, 0), (4, 16)])
def test_qlora_runs_on_the_dequantized_base_and_trains_only_adapters(bits, group):
    """A quantized base (QLoRA) computes exactly what its dequantized weights compute, the
    adapters train on it, and it stays bitwise unchanged."""
    config = TINY.replace(lora_rank=4, lora_targets=ALL, quant_bits=bits, quant_group_size=group)
    mesh = sharding.make_mesh({"data": 8})
    tx = optax.adamw(1e-2)
    graphdef, params, opt_state, frozen = state.abstract_train_state(config, tx, mesh)
    params = state._sharded_init(
        lambda: state.split_trainable(Dbrx(config, rngs=nnx.Rngs(0), mesh=mesh))[1], params
    )
    opt_state = state.init_opt_state(tx, params, mesh)
    (base,) = state._frozen_base(config, mesh, "", seed=0)
    # the abstract state (what the TPU compile report builds on) describes the base as stored
    assert jax.tree.structure(frozen[0]) == jax.tree.structure(base)
    stored = {str(p[-1]): v.get_value() for p, v in nnx.to_flat_state(base)}
    assert isinstance(stored["w1"], quant.QuantizedWeight) and stored["w1"].bits == bits
    assert not isinstance(stored["wte"], quant.QuantizedWeight)  # embeddings stay as stored
    # the same base dequantized, as plain weights: the reference
    dequantized = jax.tree.map(
        lambda v: quant.dense(v, jnp.float32),
        base,
        is_leaf=lambda x: isinstance(x, quant.QuantizedWeight),
    )
    plain = config.replace(quant_bits=0, quant_group_size=0)
    qlora = nnx.merge(graphdef, params, base)
    plain_graphdef, _, _ = state.split_trainable(
        nnx.eval_shape(lambda: Dbrx(plain, rngs=nnx.Rngs(0), mesh=mesh))
    )
    np.testing.assert_array_equal(
        _logits(qlora), _logits(nnx.merge(plain_graphdef, params, dequantized))
    )
    step = train.make_train_step(graphdef, tx)
    before = jax.tree.map(np.asarray, base)
    batch = _batch(mesh)
    losses = []
    for _ in range(3):
        params, opt_state, metrics = step(params, opt_state, batch, None, (base,))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, base), before)
    merged = nnx.merge(graphdef, params, base).merge_lora()
    assert merged.config.quant_bits == 0
    np.testing.assert_allclose(
        _logits(merged), _logits(nnx.merge(graphdef, params, base)), atol=1e-5
    )


def test_a_quantized_base_needs_adapters_and_a_group_size_that_divides():
    with pytest.raises(ValueError, match="quant_bits=4.*lora_rank > 0"):
        TINY.replace(quant_bits=4)
    with pytest.raises(ValueError, match="quant_bits=3"):
        TINY.replace(lora_rank=4, quant_bits=3)
    model = Dbrx(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="quant_group_size=5: does not divide blocks/attn/out"):
        quant.quantize_base(nnx.state(model, nnx.Param), 4, 5)
