"""The TPU kernels, compiled on this CPU host for TPU slices described by libtpu (nothing runs):
megablox's grouped GEMM (forward, d lhs, d rhs) with tiles chosen per generation, and splash
attention in place of a [T, S] score matrix. What `auto` means on TPU, and why, is checked on the
compiled programs. Skipped without libtpu (`pip install "jax[tpu]"`)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dbrx_jax import Dbrx, DbrxConfig, sharding
from dbrx_jax.model.layers import attention_impl_for
from dbrx_jax.model.splash import splash_attention
from dbrx_jax.moe import gmm, plan_moe

try:
    V5P = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
    V6E = topologies.get_topology_desc(platform="tpu", topology_name="v6e:2x2").devices
except Exception as e:  # libtpu missing (or unusable): nothing here can compile
    pytest.skip(f"compiling for TPU needs libtpu (jax[tpu]): {e}", allow_module_level=True)

TINY = DbrxConfig.preset("dbrx-tiny")
CUSTOM_CALL = 'custom_call_target="tpu_custom_call"'


def _abstract(shape, dtype, mesh, spec=None):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec or P()))


def _one_chip(devices) -> Mesh:
    return Mesh(np.array(devices[:1]), ("x",))


def _compile_gmm_vjp(devices, m, k, n, backend="megablox", groups=16):
    """Forward, d lhs and d rhs of one grouped GEMM `[m, k] x [groups, k, n]`, bf16, compiled
    for one chip of `devices` with the backend the plan gives (`for_platform`)."""
    tpu = gmm.tpu_generation(devices[0].device_kind)
    grouped = gmm.for_platform(backend, "tpu", tpu)

    def step(lhs, rhs, group_sizes):
        out, vjp = jax.vjp(lambda a, b: grouped(a, b, group_sizes), lhs, rhs)
        return vjp(out)

    mesh = _one_chip(devices)
    args = (
        _abstract((m, k), jnp.bfloat16, mesh),
        _abstract((groups, k, n), jnp.bfloat16, mesh),
        _abstract((groups,), jnp.int32, mesh),
    )
    return jax.jit(step).lower(*args).compile()


def _score_sized(text: str, rows: int) -> list[str]:
    """Float and bool buffers of the compiled program with two dimensions of at least `rows`."""
    found = set()
    for match in re.finditer(r"\b(f32|bf16|f16|pred)\[([0-9,]*)\]", text):
        dims = [int(d) for d in match.group(2).split(",") if d]
        if sum(d >= rows for d in dims) >= 2:
            found.add(match.group(0))
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# megablox


def test_generation_from_device_kind():
    assert [gmm.tpu_generation(d[0].device_kind) for d in (V5P, V6E)] == ["v5p", "v6e"]
    assert gmm.tpu_generation("TPU v5 lite") == "v5e" and gmm.tpu_generation("TPU v4") == "v4"
    assert gmm.tpu_generation("TPU7x") == "tpu7x"  # unknown: v5p's tiles (the smallest VMEM)
    assert gmm.tpu_generation("cpu") is None


def test_megablox_tile_table():
    """The tiles at DBRX's expert shapes (8192 tokens x top-4 rows, D 6144, F 10752, 16 experts,
    and F split 8 ways by `tensor`), per generation, and the rules behind them."""
    rows, D, F, E = 32768, 6144, 10752, 16
    expected = {
        ("v5p", D, F): (256, 768, 1536),
        ("v5p", F, D): (256, 768, 1536),
        ("v5p", D, F // 8): (256, 768, 1344),  # 1344 = 10.5 x 128: the whole dimension
        ("v6e", D, F): (512, 1536, 1536),
        ("v6e", F, D): (512, 1536, 1536),
        ("v6e", D, F // 8): (512, 1536, 1344),
        (None, D, F): (256, 768, 1536),  # interpreted off TPU: v5p's
    }
    for (tpu, k, n), tiles in expected.items():
        tm = gmm.megablox_rows(rows, E, tpu)
        assert gmm.megablox_tiling(tm, k, n, tpu) == tiles, (tpu, k, n)
    for tpu, chip in gmm.TPU_GEMM.items():
        for m, k, n in [(rows, D, F), (rows, F, D), (4096, D, F // 8), (40, 64, 96)]:
            tm, tk, tn = gmm.megablox_tiling(gmm.megablox_rows(m, E, tpu), k, n, tpu)
            assert gmm.megablox_vmem(tm, tk, tn) <= chip.vmem * 0.75
            assert tm % 8 == 0 and tm <= max(128, m // E)
            for dim, tile in ((k, tk), (n, tn)):
                assert dim % tile == 0 and (tile == dim or tile % 128 == 0)
                if dim % chip.lanes == 0:  # the MXU's width where the dimension allows
                    assert tile % chip.lanes == 0
    # Few rows per expert: smaller row tiles (each group's partial tiles cost a whole tile).
    assert gmm.megablox_rows(4096, 16, "v6e") == 256 and gmm.megablox_rows(40, 16, "v5p") == 40


@pytest.mark.parametrize("devices", [V5P, V6E], ids=["v5p", "v6e"])
def test_megablox_forward_and_both_gradients_lower(devices):
    """A small shape, rows not a multiple of the tile: gmm, gmm on the transposed rhs, tgmm."""
    compiled = _compile_gmm_vjp(devices, 1000, 256, 640)
    assert compiled.as_text().count(CUSTOM_CALL) == 3


@pytest.mark.slow
@pytest.mark.parametrize("devices", [V5P, V6E], ids=["v5p", "v6e"])
@pytest.mark.parametrize("k, n", [(6144, 10752), (10752, 6144)], ids=["up", "down"])
def test_megablox_lowers_at_dbrx_expert_shapes(devices, k, n):
    """8192 tokens x top-4 rows through an up (D -> F) and a down (F -> D) projection, forward
    and backward, within the generation's VMEM."""
    compiled = _compile_gmm_vjp(devices, 32768, k, n)
    assert compiled.as_text().count(CUSTOM_CALL) == 3
    assert compiled.cost_analysis()["flops"] == pytest.approx(3 * 2 * 32768 * k * n, rel=1e-3)


@pytest.mark.slow
def test_auto_grouped_gemm_on_tpu_is_megablox_because_ragged_dot_densifies_d_rhs():
    """XLA:TPU lowers ragged_dot's weight gradient as a masked dense product over all groups
    (E times the FLOPs of that GEMM); megablox's tgmm does the grouped one."""
    m, k, n, groups = 4096, 512, 1024, 16
    ragged = _compile_gmm_vjp(V5P, m, k, n, backend="ragged_dot", groups=groups)
    mega = _compile_gmm_vjp(V5P, m, k, n, backend="megablox", groups=groups)
    one_gemm = 2 * m * k * n
    assert mega.cost_analysis()["flops"] == pytest.approx(3 * one_gemm, rel=1e-3)
    assert ragged.cost_analysis()["flops"] >= (2 + groups) * one_gemm * 0.99
    assert f"bf16[{groups},{k},{n}]" in ragged.as_text()  # the dense [E, k, n] product
    plan = plan_moe(TINY, sharding.make_mesh({"fsdp": 2, "expert": 2}, devices=V5P))
    assert (plan.gmm.backend, plan.gmm.tpu, plan.gmm.interpret) == ("megablox", "v5p", False)
    assert gmm.default_backend("cpu") == "blocked"  # CPU and GPU as before


# ---------------------------------------------------------------------------------------------
# splash attention


def test_auto_attention_is_splash_on_tpu_devices_and_xla_elsewhere():
    assert attention_impl_for("auto", "cpu") == "xla" and attention_impl_for("auto", "gpu") == "xla"
    assert attention_impl_for("auto", "tpu") == "splash"
    assert attention_impl_for("reference", "tpu") == "reference"
    assert TINY.attention_impl == "auto"
    on_cpu = Dbrx(TINY, rngs=nnx.Rngs(0))
    assert on_cpu.attention_impl == "xla" and on_cpu.blocks.attn.impl == "xla"
    mesh = sharding.make_mesh({"fsdp": 2, "expert": 2}, devices=V5P)
    on_tpu = nnx.eval_shape(lambda: Dbrx(TINY, rngs=nnx.Rngs(0), mesh=mesh))
    assert on_tpu.attention_impl == "splash" and on_tpu.blocks.attn.impl == "splash"
    assert on_tpu.blocks.attn.cache_impl == "xla" and not on_tpu.blocks.attn.interpret


@pytest.mark.slow
@pytest.mark.parametrize(
    "devices", [V5P, pytest.param(V6E, marks=pytest.mark.slow)], ids=["v5p", "v6e"]
)
def test_splash_attention_at_32k_has_no_score_matrix(devices):
    """Forward and backward of GQA attention over 32k packed tokens, batch and heads split over
    the mesh: no buffer of [.., T, S], and temporaries linear in T."""
    B, T, N, K, H = 4, 32768, 8, 2, 128
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2}, devices=devices)
    batch = P(("data", "fsdp", "expert"))

    def step(q, k, v, segment_ids):
        out, vjp = jax.vjp(lambda *a: splash_attention(*a, segment_ids, mesh=mesh), q, k, v)
        return vjp(out)

    args = (
        _abstract((B, T, N, H), jnp.bfloat16, mesh, batch),
        _abstract((B, T, K, H), jnp.bfloat16, mesh, batch),
        _abstract((B, T, K, H), jnp.bfloat16, mesh, batch),
        _abstract((B, T), jnp.int32, mesh, batch),
    )
    compiled = jax.jit(step).lower(*args).compile()
    assert _score_sized(compiled.as_text(), T) == []
    assert compiled.as_text().count(CUSTOM_CALL) == 3  # forward, dq, dkv
    # Per chip: 2 rows x 4 heads of q, k, v, out and their gradients, a few copies each.
    qkv_bytes = 2 * T * (N + 2 * K) // 2 * H * 2
    assert compiled.memory_analysis().temp_size_in_bytes < 8 * qkv_bytes


@pytest.mark.slow
def test_tiny_model_train_step_on_v5p_has_no_score_matrix():
    """dbrx-tiny's forward and backward over 4096 packed tokens per row (padding included),
    `attention_impl="auto"` on a v5p mesh: splash, no [T, S] buffer. (ragged_dot for the
    experts keeps the compile short here; megablox is compiled above.)"""
    T = 4096
    config = TINY.replace(max_seq_len=T, dtype="bfloat16", moe_gmm_impl="ragged_dot")
    mesh = sharding.make_mesh({"fsdp": 2, "expert": 2}, devices=V5P)
    model = nnx.eval_shape(lambda: Dbrx(config, rngs=nnx.Rngs(0), mesh=mesh))
    assert model.attention_impl == "splash"
    graphdef, state = nnx.split(model)
    state = jax.tree.map(
        lambda s, v: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
        sharding.param_shardings(state, mesh),
        state,
    )

    def loss(state, tokens_BT, segment_ids_BT):
        logits = nnx.merge(graphdef, state)(tokens_BT, segment_ids_BT=segment_ids_BT).logits
        return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), -1) * (segment_ids_BT > 0))

    batch = P(sharding.BATCH_AXES)
    rows = _abstract((4, T), jnp.int32, mesh, batch)
    compiled = jax.jit(jax.value_and_grad(loss)).lower(state, rows, rows).compile()
    assert _score_sized(compiled.as_text(), T) == []
    # The XLA path holds f32 and bf16 [.., 4096, 4096] scores (about 1.5 GiB of temporaries).
    assert compiled.memory_analysis().temp_size_in_bytes < 512 * 2**20
