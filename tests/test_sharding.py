"""Mesh, sharding rules, expert parallelism (both exchanges) against one device, and the
multi-process runtime on localhost."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dbrx_jax import Dbrx, DbrxConfig, data, sharding, state, train
from tests import helpers

TINY = DbrxConfig.preset("dbrx-tiny")
MESHES = [
    {"data": 8},
    {"expert": 8},
    {"data": 2, "expert": 4},
    {"fsdp": 2, "expert": 2, "tensor": 2},
    {"fsdp": 4, "expert": 2},
]


def _mesh_id(sizes):
    return "x".join(f"{k}{v}" for k, v in sizes.items())


def test_make_mesh_sizes_and_errors():
    mesh = sharding.make_mesh({"data": 2, "expert": -1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="unknown axes \\['model'\\]"):
        sharding.make_mesh({"model": 8})
    with pytest.raises(ValueError, match="needs 6 devices, there are 8"):
        sharding.make_mesh({"data": 2, "expert": 3})
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh({"data": -1, "expert": -1})


def test_parse_mesh():
    assert sharding.parse_mesh("fsdp=8, expert=8") == {"fsdp": 8, "expert": 8}
    with pytest.raises(ValueError, match="expected axis=size items"):
        sharding.parse_mesh("expert8")


def test_logical_rules():
    sizes = {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
    # Experts over `expert`, their D over fsdp, F over tensor.
    assert sharding.logical_to_spec(
        ("layers", "expert", "embed", "mlp"), (2, 16, 64, 96), sizes
    ) == P(None, "expert", "fsdp", "tensor")
    # Other weights: D over fsdp and expert (the expert axis is data parallel outside the MoE).
    assert sharding.logical_to_spec(
        ("layers", "embed", "kv_heads", "qkv", "head_dim"), (2, 64, 2, 4, 16), sizes
    ) == P(None, ("fsdp", "expert"), "tensor", None, None)
    # A mesh axis that does not divide the dimension is dropped.
    assert sharding.logical_to_spec(("vocab", "embed"), (513, 64), sizes) == P(
        None, ("fsdp", "expert")
    )
    with pytest.raises(ValueError, match="logical axis 'hidden' has no sharding rule"):
        sharding.logical_to_spec(("hidden",))


def _loss(graphdef, state, tokens):
    out = nnx.merge(graphdef, state)(tokens)
    loss = jnp.mean(jax.nn.log_softmax(out.logits.astype(jnp.float32))[..., 3])
    return loss + jnp.mean(out.router.logits_LBTE**2), out.logits


@pytest.fixture(scope="module")
def single_device():
    model = Dbrx(TINY, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, TINY.vocab_size, (8, 12)), jnp.int32)
    graphdef, state = nnx.split(model)
    grads, logits = jax.jit(jax.grad(lambda s, t: _loss(graphdef, s, t), has_aux=True))(
        state, tokens
    )
    return state, tokens, logits, grads


@pytest.mark.slow
@pytest.mark.parametrize("exchange", ["all_gather", "all_to_all"])
@pytest.mark.parametrize("sizes", MESHES, ids=[_mesh_id(m) for m in MESHES])
def test_sharded_equals_single_device(sizes, exchange, single_device):
    state, tokens, ref_logits, ref_grads = single_device
    mesh = sharding.make_mesh(sizes)
    config = TINY.replace(moe_exchange=exchange)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Dbrx(config, rngs=nnx.Rngs(0), mesh=mesh)))
    sharded_state = jax.device_put(state, sharding.param_shardings(state, mesh))
    sharded_tokens = jax.device_put(tokens, NamedSharding(mesh, P(sharding.BATCH_AXES)))
    grads, logits = jax.jit(jax.grad(lambda s, t: _loss(graphdef, s, t), has_aux=True))(
        sharded_state, sharded_tokens
    )
    scale = np.abs(ref_logits).max()
    assert np.abs(np.asarray(logits) - ref_logits).max() <= 1e-5 * scale
    for (path, g), g_ref in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True
    ):
        assert np.abs(np.asarray(g) - g_ref).max() <= 1e-5 * np.abs(g_ref).max(), path


@pytest.mark.slow
@pytest.mark.parametrize("exchange", ["all_gather", "all_to_all"])
def test_fused_gate_up_sharded_over_tensor_equals_single_device(exchange, single_device):
    """Each device fuses its own F-blocks of w1 and v1, so a tensor split stays correct."""
    state, tokens, ref_logits, ref_grads = single_device
    mesh = sharding.make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
    config = TINY.replace(moe_exchange=exchange, moe_fuse_gate_up=True)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Dbrx(config, rngs=nnx.Rngs(0), mesh=mesh)))
    sharded_state = jax.device_put(state, sharding.param_shardings(state, mesh))
    sharded_tokens = jax.device_put(tokens, NamedSharding(mesh, P(sharding.BATCH_AXES)))
    grads, logits = jax.jit(jax.grad(lambda s, t: _loss(graphdef, s, t), has_aux=True))(
        sharded_state, sharded_tokens
    )
    assert np.abs(np.asarray(logits) - ref_logits).max() <= 1e-5 * np.abs(ref_logits).max()
    for (path, g), g_ref in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True
    ):
        assert np.abs(np.asarray(g) - g_ref).max() <= 1e-5 * np.abs(g_ref).max(), path


def _expert_weight_gathers(hlo: str, config: DbrxConfig, sizes) -> list[str]:
    """all-gathers whose result holds every expert with (sharded or whole) D and F dims."""
    E, D, F = config.moe_num_experts, config.d_model, config.ffn_hidden_size
    d_dims = {D, D // sizes.get("fsdp", 1)}
    f_dims = {F, F // sizes.get("tensor", 1)}
    found = []
    for line in hlo.splitlines():
        if "all-gather" not in line.split("=", 1)[-1].split("(")[0]:
            continue
        match = re.search(r"=\s*\(?\w+\[([\d,]*)\]", line)
        dims = [int(d) for d in match.group(1).split(",") if d] if match else []
        for a, b, c in zip(dims, dims[1:], dims[2:], strict=False):
            if a == E and ((b in d_dims and c in f_dims) or (b in f_dims and c in d_dims)):
                found.append(line.strip()[:160])
    return found


def _compiled_train_step_hlo(config, sizes):
    mesh = sharding.make_mesh(sizes)
    tx = optax.adamw(1e-3)
    graphdef, params, opt_state, _ = state.init_train_state(config, tx, mesh)
    batch = sharding.shard_batch(data.model_batch(np.zeros((8, 13), np.int32)), mesh)

    def step(params, opt_state, batch):
        grads, _ = jax.grad(lambda p: train.loss_fn(nnx.merge(graphdef, p), batch), has_aux=True)(
            params
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step).lower(params, opt_state, batch).compile().as_text()


@pytest.mark.parametrize(
    "sizes",
    [{"expert": 8}, {"fsdp": 2, "expert": 2, "tensor": 2}],
    ids=["expert8", "fsdp2xexpert2xtensor2"],
)
@pytest.mark.slow
def test_train_step_never_gathers_expert_weights_over_expert(sizes):
    hlo = _compiled_train_step_hlo(TINY, sizes)
    assert "all-gather" in hlo  # FSDP gathers the other weights
    assert _expert_weight_gathers(hlo, TINY, sizes) == []


def test_the_gather_detector_catches_a_gather_over_expert():
    mesh = sharding.make_mesh({"expert": 8})
    w = jax.device_put(jnp.ones((16, 64, 96)), NamedSharding(mesh, P("expert")))
    hlo = (
        jax.jit(lambda w: w * 2, out_shardings=NamedSharding(mesh, P()))
        .lower(w)
        .compile()
        .as_text()
    )
    assert _expert_weight_gathers(hlo, TINY, {"expert": 8})


def test_expert_bytes_per_device_shrink_as_one_over_expert():
    abstract = nnx.eval_shape(lambda: Dbrx(TINY, rngs=nnx.Rngs(0)))
    experts = nnx.state(abstract.blocks.ffn, lambda path, v: path[-1] in ("w1", "v1", "w2"))
    full = sharding.bytes_per_device(experts, {a: 1 for a in sharding.MESH_AXES})
    for n in (1, 2, 4, 8):
        sizes = {"data": 8 // n, "fsdp": 1, "expert": n, "tensor": 1}
        assert sharding.bytes_per_device(experts, sizes) == full // n


@pytest.mark.slow
def test_initialised_directly_into_the_sharded_layout():
    mesh = sharding.make_mesh({"fsdp": 2, "expert": 4})
    model = sharding.shard_module(lambda: Dbrx(TINY, rngs=nnx.Rngs(0), mesh=mesh), mesh)
    assert model.mesh is mesh and model.plan.expert_parallel
    w1 = model.blocks.ffn.w1[...]
    assert w1.sharding.spec == P(None, "expert", "fsdp", None)
    assert w1.addressable_shards[0].data.shape == (2, 4, 32, 96)
    # The same values as an unsharded build from the same seed (up to XLA fusing the init).
    np.testing.assert_allclose(w1, Dbrx(TINY, rngs=nnx.Rngs(0)).blocks.ffn.w1[...], rtol=1e-6)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    worker = "tests/distributed_worker.py"
    single = helpers.run(worker, "--devices=8")
    expected = json.loads(single.stdout.strip().splitlines()[-1])["losses"]
    for result in helpers.run_processes(worker):
        np.testing.assert_allclose(result["losses"], expected, rtol=1e-6)
