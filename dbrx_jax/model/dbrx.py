"""The DBRX causal language model: embedding, a scan over pre-LN MoE blocks, final norm, lm_head.

    h = wte[tokens]
    for each layer:  h = h + attn(norm_1(h));  h = h + moe(norm_2(h))
    logits = norm_f(h) @ lm_head            (untied; no embedding scaling)

The layers are created with `nnx.vmap` (every block parameter gains a leading L axis) and run
with `jax.lax.scan`, so the compiled program does not grow with depth and remat applies per
block. Training, prefill and decoding are one call and one scan: a `KVCache` makes it fill and
read the cache. A model is built for a mesh (or none): its MoE plan (moe/plan.py) and its
sharding constraints are fixed then. Shape letters as in dbrx_jax/model/__init__.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import Mesh

from dbrx_jax import lora, sharding
from dbrx_jax.config import REMAT_POLICIES, DbrxConfig
from dbrx_jax.model.block import ACTIVATION_AXES, DbrxBlock
from dbrx_jax.model.layers import (
    LayerCache,
    LayerNorm,
    attention_impl_for,
    attention_mask,
    rope_tables,
)
from dbrx_jax.moe.plan import plan_moe
from dbrx_jax.moe.routing import Routing
from dbrx_jax.nn import MATMUL_RESULTS, at_least_fp32, param
from dbrx_jax.quant import QuantizedWeight, dense
from dbrx_jax.sharding import constrain

CACHE_AXES = ("layers", "batch", "seq", "kv_heads", "head_dim")

# DbrxConfig.remat_policy -> what jax.checkpoint may save of each block ("none": no remat).
CHECKPOINT_POLICIES = {
    "full": None,  # save nothing but the block's inputs
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Every matmul's result, the kernels' included (cuDNN attention and the grouped GEMMs are
    # custom calls, which the dots policies do not see): the backward pass recomputes only
    # norms, RoPE, activations and row movement.
    "matmuls": jax.checkpoint_policies.save_only_these_names(*MATMUL_RESULTS),
}
assert {"none", *CHECKPOINT_POLICIES} == set(REMAT_POLICIES)
# `scan_unroll=0` on CPU unrolls the training step of models up to this deep.
CPU_UNROLL_LAYERS = 8


def layer_unroll_for(config: DbrxConfig, platform: str, *, training: bool) -> int:
    """Blocks per iteration of the layer scan (`DbrxConfig.scan_unroll`; 0 is auto). Auto is 1
    (the program does not grow with depth) but for the training step on CPU of a model up to
    CPU_UNROLL_LAYERS deep: all of them. XLA:CPU's loop stacks every block's saved activations
    for the backward pass and slices them back, which costs the dbrx-small step about 7% on 2
    cores (0.620 s scanned, 0.577 s unrolled, interleaved in one process). Without a backward
    pass the scan is the faster one (forward 4 x 256: 156 ms against 177 ms; prefill 46 ms
    against 58 ms)."""
    if config.scan_unroll:
        return config.scan_unroll
    small = config.n_layers <= CPU_UNROLL_LAYERS
    return config.n_layers if training and platform == "cpu" and small else 1


@struct.dataclass
class KVCache:
    """Keys (after RoPE) and values (after clipping) of every layer, preallocated for S slots.

    segment_ids_BS: the segment of the token in each slot; 0 for left padding and empty slots
      (nothing attends to those from another segment).
    length: slots written so far, the same for every row (prompts are left-padded).
    """

    k_LBSKH: jax.Array
    v_LBSKH: jax.Array
    segment_ids_BS: jax.Array
    length: jax.Array

    @classmethod
    def zeros(cls, config: DbrxConfig, batch: int, max_len: int) -> KVCache:
        shape = (config.n_layers, batch, max_len, config.kv_n_heads, config.head_dim)
        zeros = jnp.zeros(shape, config.compute_dtype)
        return cls(
            k_LBSKH=zeros,
            v_LBSKH=zeros,
            segment_ids_BS=jnp.zeros((batch, max_len), jnp.int32),
            length=jnp.zeros((), jnp.int32),
        )


@struct.dataclass
class DbrxOutput:
    """logits: `[B, T, V]` in the compute dtype (`[B, 1, V]` with `last_only`); None with
      `head=False`, which gives `hidden` instead: the final normed states `[B, T, D]`, for the
      LM head (`Dbrx.unembed`) at positions of one's choosing.
    router: every layer's routing: what the load-balancing loss and router probes read.
    cache: the updated KV cache when one was given, else None."""

    logits: jax.Array | None
    router: Routing
    cache: KVCache | None = None
    hidden: jax.Array | None = None


def positions_from_segments(segment_ids_BT: jax.Array) -> jax.Array:
    """Per-segment positions: 0, 1, 2, ... restarting wherever the segment id changes."""
    T = segment_ids_BT.shape[1]
    index_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), segment_ids_BT.shape)
    starts_BT = jnp.concatenate(
        [
            jnp.ones_like(segment_ids_BT[:, :1], bool),
            segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1],
        ],
        axis=1,
    )
    start_index_BT = jax.lax.cummax(jnp.where(starts_BT, index_BT, 0), axis=1)
    return index_BT - start_index_BT


class Dbrx(nnx.Module):
    """DBRX for causal LM (transformers' `DbrxForCausalLM`), in Flax NNX.

    Build with `Dbrx(config, rngs=nnx.Rngs(seed), mesh=None)`, or load released weights with
    `dbrx_jax.from_pretrained`. `mesh` (from `sharding.make_mesh`) is the mesh the model runs on:
    it fixes the MoE plan and the activation constraints. Call on int32 tokens `[B, T]`;
    returns `DbrxOutput`.
    """

    def __init__(self, config: DbrxConfig, *, rngs: nnx.Rngs, mesh: Mesh | None = None):
        for field in ("resid_pdrop", "emb_pdrop", "attn_pdrop"):
            if getattr(config, field):
                raise NotImplementedError(
                    f"DbrxConfig.{field}={getattr(config, field)}: dropout is not implemented "
                    "(DBRX is trained without it); set it to 0"
                )
        if "float64" in (config.dtype, config.param_dtype) and not jax.config.jax_enable_x64:
            raise ValueError(
                "DbrxConfig dtype float64 needs jax.config.update('jax_enable_x64', "
                "True) before the model is built"
            )
        self.config = config
        self.plan = plan_moe(config, mesh)  # holds the mesh too (`self.mesh`)
        # The attention of the blocks (each resolves it the same way): with splash, tokens
        # attending to each other take segment ids, and no [B, 1, T, S] mask is built.
        self.attention_impl = attention_impl_for(config.attention_impl, self.plan.platform)
        std = config.initializer_range
        V, D = config.vocab_size, config.d_model
        self.wte = param(rngs, (V, D), ("vocab", "embed"), config, std=std)

        @nnx.split_rngs(splits=config.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create_blocks(rngs: nnx.Rngs) -> DbrxBlock:
            return DbrxBlock(config, self.plan, rngs=rngs)

        self.blocks = create_blocks(rngs)
        for _, variable in nnx.iter_graph(self.blocks):  # the new leading axis is the layer
            if isinstance(variable, nnx.Param):
                variable.set_metadata(
                    "logical_axes", ("layers", *variable.get_metadata("logical_axes"))
                )
        self.norm_f = LayerNorm(config)
        self.lm_head = param(rngs, (D, V), ("embed", "vocab"), config, std=std)

    def __call__(
        self,
        tokens_BT: jax.Array | None = None,
        *,
        inputs_embeds_BTD: jax.Array | None = None,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        cache: KVCache | None = None,
        jitter_key: jax.Array | None = None,
        last_only: bool = False,
        head: bool = True,
        training: bool = False,
    ) -> DbrxOutput:
        """Forward pass over T tokens.

        tokens_BT: int token ids (or `inputs_embeds_BTD` instead: the embedded input).
        segment_ids_BT: for packed sequences, tokens attend only within their own segment. With
          padding, give padding its own id (0) and mask it out of the loss.
        positions_BT: RoPE positions; by default 0, 1, ... restarting at every segment, after
          the real tokens already in the cache.
        cache: a `KVCache` to fill at slots [length, length + T) and attend over (prefill and
          decoding). A cached row holds one sequence after its left padding (segment 0).
        jitter_key: a PRNG key turns on the router jitter of training (if moe_jitter_eps > 0).
        last_only: logits of the last position only (what generation samples from).
        head: False skips the LM head: `hidden` instead of `logits` (scoring applies the head at
          the positions it reads, `unembed`).
        training: the forward of a training step, whose gradient is taken (how the layer loop
          compiles: `layer_unroll_for`; the values are the same).
        """
        c = self.config
        if (tokens_BT is None) == (inputs_embeds_BTD is None):
            raise ValueError("pass exactly one of tokens_BT and inputs_embeds_BTD")
        if tokens_BT is not None:
            if not jnp.issubdtype(tokens_BT.dtype, jnp.integer) or tokens_BT.ndim != 2:
                raise ValueError(
                    f"tokens_BT: expected integer ids of shape [B, T], got "
                    f"{tokens_BT.dtype}{list(tokens_BT.shape)}"
                )
            h_BTD = self.embed(tokens_BT)
        else:
            h_BTD = constrain(inputs_embeds_BTD.astype(c.compute_dtype), ACTIVATION_AXES, self.mesh)
        B, T, _ = h_BTD.shape
        if cache is None:
            positions_BT, mask_B1TS = self._sequence_layout(B, T, positions_BT, segment_ids_BT)
            if self.attention_impl != "splash":
                segment_ids_BT = None  # in the mask
        else:
            segment_ids_BT = (
                jnp.ones((B, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT
            )
            positions_BT, mask_B1TS, cache = self._cache_layout(positions_BT, segment_ids_BT, cache)
            segment_ids_BT = None  # in the mask
        cos_BTH, sin_BTH = rope_tables(positions_BT, c.head_dim, c.rope_theta, c.compute_dtype)

        h_BTD, router, cache = self._run_blocks(
            h_BTD,
            cos_BTH,
            sin_BTH,
            mask_B1TS,
            cache,
            jitter_key,
            segment_ids_BT,
            layer_unroll_for(c, self.plan.platform, training=training),
        )

        if last_only:
            h_BTD = h_BTD[:, -1:]
        with jax.named_scope("lm_head"):
            h_BTD = self.norm_f(h_BTD)
        if not head:
            return DbrxOutput(logits=None, router=Routing.stack(router), cache=cache, hidden=h_BTD)
        return DbrxOutput(logits=self.unembed(h_BTD), router=Routing.stack(router), cache=cache)

    def unembed(self, h_BTD: jax.Array) -> jax.Array:
        """The LM head: final normed states `[B, T, D]` to logits `[B, T, V]`."""
        with jax.named_scope("lm_head"):
            logits_BTV = jnp.einsum(
                "BTD,DV->BTV", h_BTD, self.lm_head[...].astype(self.config.compute_dtype)
            )
            return constrain(logits_BTV, ("batch", "seq", "vocab"), self.mesh)

    def embed(self, tokens_BT: jax.Array) -> jax.Array:
        """Token embeddings `[B, T, D]` in the compute dtype."""
        # Gather the FSDP shards of the table first (as for any weight); GSPMD then does the
        # lookup from the vocab-sharded table with a masked gather and a psum.
        table_VD = constrain(self.wte[...], ("vocab", "act_embed"), self.mesh)
        h_BTD = jnp.take(table_VD, tokens_BT, axis=0).astype(self.config.compute_dtype)
        return constrain(h_BTD, ACTIVATION_AXES, self.mesh)

    @property
    def mesh(self) -> Mesh | None:
        """The mesh the model was built for (None: one device)."""
        return self.plan.mesh

    def on_mesh(self, mesh: Mesh | None) -> Dbrx:
        """This model's parameters as a model built for `mesh`: laid out by the sharding rules,
        with that mesh's MoE plan (for serving a model loaded on one device, say)."""
        graphdef, _ = nnx.split(
            nnx.eval_shape(lambda: Dbrx(self.config, rngs=nnx.Rngs(0), mesh=mesh))
        )
        state = nnx.state(self)
        if mesh is not None:
            state = jax.device_put(state, sharding.param_shardings(state, mesh))
        return nnx.merge(graphdef, state)

    def merge_lora(self) -> Dbrx:
        """This model without its adapters (lora.py): every adapted weight becomes
        `W + scale * A B` (summed in at least fp32, stored in `param_dtype`; a quantized base is
        dequantized), on the same mesh. What an export with `--merge_lora` writes, and what
        transformers then loads."""
        config = self.config.replace(lora_rank=0, quant_bits=0, quant_group_size=0)
        graphdef, _ = nnx.split(
            nnx.eval_shape(lambda: Dbrx(config, rngs=nnx.Rngs(0), mesh=self.mesh))
        )
        weights = dict(nnx.to_flat_state(nnx.state(self, nnx.Param)))
        merged = {path: v for path, v in weights.items() if not isinstance(v, nnx.LoRAParam)}
        for path, module in nnx.iter_graph(self):
            if isinstance(module, lora.Adapter):
                weight_path = (*path[:-1], str(path[-1]).removesuffix("_lora"))
                w = merged[weight_path]
                total = dense(w.get_value(), at_least_fp32(config.weight_dtype)) + module.delta()
                merged[weight_path] = w.replace(total.astype(config.weight_dtype))
        for path, w in merged.items():  # a QLoRA base's other matrices: dequantized too
            if isinstance(w.get_value(), QuantizedWeight):
                merged[path] = w.replace(dense(w.get_value(), config.weight_dtype))
        return nnx.merge(graphdef, nnx.from_flat_state(list(merged.items())))

    def _sequence_layout(self, B, T, positions_BT, segment_ids_BT):
        """Positions and mask of T tokens that attend only to each other (training); no mask
        for splash, which reads the segment ids."""
        if positions_BT is None:
            positions_BT = (
                jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
                if segment_ids_BT is None
                else positions_from_segments(segment_ids_BT)
            )
        if self.attention_impl == "splash":
            return positions_BT, None
        return positions_BT, attention_mask(segment_ids_BT)

    def _cache_layout(self, positions_BT, segment_ids_BT, cache: KVCache):
        """Positions and mask of T tokens entering the cache at slot `cache.length`: each query
        attends to the slots up to its own that hold its segment."""
        start = cache.length
        S = cache.segment_ids_BS.shape[1]
        T = segment_ids_BT.shape[1]
        if positions_BT is None:
            written_BS = (cache.segment_ids_BS != 0) & (jnp.arange(S) < start)
            positions_BT = written_BS.sum(axis=1, dtype=jnp.int32)[:, None]
            positions_BT = positions_BT + positions_from_segments(segment_ids_BT)
        segment_ids_BS = jax.lax.dynamic_update_slice_in_dim(
            cache.segment_ids_BS, segment_ids_BT.astype(jnp.int32), start, axis=1
        )
        causal_TS = jnp.arange(S)[None, :] <= (start + jnp.arange(T))[:, None]
        mask_B1TS = causal_TS[None, None] & attention_mask(segment_ids_BT, segment_ids_BS)
        return positions_BT, mask_B1TS, cache.replace(segment_ids_BS=segment_ids_BS)

    def _run_blocks(
        self,
        h_BTD,
        cos_BTH,
        sin_BTH,
        mask_B1TS,
        cache: KVCache | None,
        jitter_key,
        segment_ids_BT,
        unroll: int,
    ):
        """`lax.scan` over the stacked blocks, each optionally rematerialised. The KV cache (if
        any) is carried and each layer's slice updated in place. `segment_ids_BT`: for splash
        attention, in place of the mask."""
        graphdef, stacked_state = nnx.split(self.blocks)
        L = self.config.n_layers
        keys_L = None if jitter_key is None else jax.random.split(jitter_key, L)
        start = None if cache is None else cache.length

        def body(carry, layer):
            h_BTD, kv = carry
            layer_state, key, index = layer
            block = nnx.merge(graphdef, layer_state)
            layer_cache = None if kv is None else LayerCache(kv[0][index], kv[1][index], start)
            h_BTD, router, layer_cache = block(
                h_BTD, cos_BTH, sin_BTH, mask_B1TS, layer_cache, key, segment_ids_BT
            )
            if kv is not None:
                kv = tuple(
                    jax.lax.dynamic_update_index_in_dim(stacked, new, index, 0)
                    for stacked, new in zip(
                        kv, (layer_cache.k_BSKH, layer_cache.v_BSKH), strict=True
                    )
                )
            return (h_BTD, kv), router

        if self.config.remat_policy != "none":
            body = jax.checkpoint(
                body, policy=CHECKPOINT_POLICIES[self.config.remat_policy], prevent_cse=False
            )
        kv = None
        if cache is not None:
            kv = tuple(constrain(x, CACHE_AXES, self.mesh) for x in (cache.k_LBSKH, cache.v_LBSKH))
        (h_BTD, kv), router = jax.lax.scan(
            body, (h_BTD, kv), (stacked_state, keys_L, jnp.arange(L)), unroll=unroll
        )
        if cache is not None:
            cache = cache.replace(
                k_LBSKH=kv[0], v_LBSKH=kv[1], length=cache.length + h_BTD.shape[1]
            )
        return h_BTD, router, cache
