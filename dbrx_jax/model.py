"""The DBRX causal language model: embedding, a scan over pre-LN MoE blocks, final norm, lm_head.

    h = wte[tokens]
    for each layer:  h = h + attn(norm_1(h));  h = h + moe(norm_2(h))
    logits = norm_f(h) @ lm_head            (untied; no embedding scaling)

The layers are created with `nnx.vmap` (every block parameter gains a leading L axis) and run
with `jax.lax.scan`, so the compiled program does not grow with depth and remat applies per
block. Shape legend as in layers.py and moe.py; V vocab, L layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from dbrx_jax.config import REMAT_POLICIES, DbrxConfig
from dbrx_jax.layers import (
    SAVED_BY_MATMULS_POLICY,
    Attention,
    LayerNorm,
    attention_mask,
    param,
    rope_tables,
)
from dbrx_jax.moe import MoE, RouterOutput
from dbrx_jax.sharding import constrain

ACTIVATION_AXES = ("batch", "seq", "act_embed")  # the residual stream between blocks

# DbrxConfig.remat_policy -> what jax.checkpoint may save of each block ("none": no remat).
CHECKPOINT_POLICIES = {
    "full": None,  # save nothing but the block's inputs
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Every matmul's result, the kernels' included (cuDNN attention and the grouped GEMMs are
    # custom calls, which the dots policies do not see): the backward pass recomputes only
    # norms, RoPE, activations and row movement.
    "matmuls": jax.checkpoint_policies.save_only_these_names(*SAVED_BY_MATMULS_POLICY),
}
assert {"none", *CHECKPOINT_POLICIES} == set(REMAT_POLICIES)


@struct.dataclass
class DbrxOutput:
    """logits: `[B, T, V]` in the compute dtype. router: each layer's routing, stacked
    (`logits_BTE` becomes `[L, B, T, E]`): what the load-balancing loss and router probes need."""

    logits: jax.Array
    router: RouterOutput


@struct.dataclass
class KVCache:
    """Keys (after RoPE) and values (after clipping) of every layer, preallocated for S slots.

    k, v: `[L, B, S, K, H]`. valid_BS: the slot holds a real token (left padding does not).
    length: slots written so far, the same for every row (prompts are left-padded).
    """

    k: jax.Array
    v: jax.Array
    valid_BS: jax.Array
    length: jax.Array

    @classmethod
    def zeros(cls, config: DbrxConfig, batch: int, max_len: int) -> KVCache:
        shape = (config.n_layers, batch, max_len, config.kv_n_heads, config.head_dim)
        zeros = jnp.zeros(shape, config.compute_dtype)
        return cls(
            k=zeros,
            v=zeros,
            valid_BS=jnp.zeros((batch, max_len), bool),
            length=jnp.zeros((), jnp.int32),
        )


CACHE_AXES = ("layers", "batch", "seq", "kv_heads", "head_dim")


class DbrxBlock(nnx.Module):
    def __init__(self, config: DbrxConfig, *, rngs: nnx.Rngs):
        self.norm_1 = LayerNorm(config)
        self.attn = Attention(config, rngs=rngs)
        self.norm_2 = LayerNorm(config)
        self.ffn = MoE(config, rngs=rngs)

    def __call__(
        self,
        h_BTD: jax.Array,
        cos_BTH: jax.Array,
        sin_BTH: jax.Array,
        mask_B1TS: jax.Array | None,
        jitter_key: jax.Array | None,
    ) -> tuple[jax.Array, RouterOutput]:
        h_BTD = h_BTD + self.attn(self.norm_1(h_BTD), cos_BTH, sin_BTH, mask_B1TS)
        moe = self.ffn(self.norm_2(h_BTD), jitter_key)
        return constrain(h_BTD + moe.y_BTD, ACTIVATION_AXES), moe.router

    def cached(self, h_BTD, cos_BTH, sin_BTH, mask_B1TS, k_cache_BSKH, v_cache_BSKH, start):
        """The block for new tokens against this layer's KV cache (see Attention.cached)."""
        attn_BTD, k_cache_BSKH, v_cache_BSKH = self.attn.cached(
            self.norm_1(h_BTD), cos_BTH, sin_BTH, mask_B1TS, k_cache_BSKH, v_cache_BSKH, start
        )
        h_BTD = h_BTD + attn_BTD
        return h_BTD + self.ffn(self.norm_2(h_BTD)).y_BTD, k_cache_BSKH, v_cache_BSKH


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

    Build with `Dbrx(config, rngs=nnx.Rngs(seed))`, or load released weights with
    `dbrx_jax.from_pretrained`. Call on int32 tokens `[B, T]`; returns `DbrxOutput`.
    """

    def __init__(self, config: DbrxConfig, *, rngs: nnx.Rngs):
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
        std = config.initializer_range
        V, D = config.vocab_size, config.d_model
        self.wte = param(rngs, (V, D), ("vocab", "embed"), config, std=std)

        @nnx.split_rngs(splits=config.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create_blocks(rngs: nnx.Rngs) -> DbrxBlock:
            return DbrxBlock(config, rngs=rngs)

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
        jitter_key: jax.Array | None = None,
    ) -> DbrxOutput:
        """Forward pass.

        tokens_BT: int token ids (or `inputs_embeds_BTD` instead: the embedded input).
        segment_ids_BT: for packed sequences, tokens attend only within their own segment. With
          padding, give padding its own id (e.g. 0) and mask it out of the loss.
        positions_BT: RoPE positions; by default 0..T-1, restarting at every segment.
        jitter_key: a PRNG key turns on the router jitter of training (if moe_jitter_eps > 0).
        """
        c = self.config
        dtype = c.compute_dtype
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
            h_BTD = constrain(inputs_embeds_BTD.astype(dtype), ACTIVATION_AXES)
        B, T, _ = h_BTD.shape
        if positions_BT is None:
            positions_BT = (
                jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
                if segment_ids_BT is None
                else positions_from_segments(segment_ids_BT)
            )
        cos_BTH, sin_BTH = rope_tables(positions_BT, c.head_dim, c.rope_theta, dtype)
        mask_B1TS = attention_mask(segment_ids_BT)

        h_BTD, router = self._run_blocks(h_BTD, cos_BTH, sin_BTH, mask_B1TS, jitter_key)

        with jax.named_scope("lm_head"):
            logits_BTV = self.logits(self.norm_f(h_BTD))
        return DbrxOutput(logits=logits_BTV, router=router)

    def extend(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array,
        valid_BT: jax.Array,
        cache: KVCache,
    ) -> tuple[jax.Array, KVCache]:
        """Runs T new tokens (a prompt, or one step of decoding) through the model against the
        KV cache, filling its next T slots. `valid_BT` is False for left padding (nothing
        attends to those slots). Returns the final-norm hidden states `[B, T, D]` (`logits`
        turns the ones needed into logits) and the updated cache."""
        c = self.config
        T = tokens_BT.shape[1]
        h_BTD = self.embed(tokens_BT)
        cos_BTH, sin_BTH = rope_tables(positions_BT, c.head_dim, c.rope_theta, c.compute_dtype)
        start = cache.length
        valid_BS = jax.lax.dynamic_update_slice_in_dim(cache.valid_BS, valid_BT, start, axis=1)
        S = valid_BS.shape[1]
        slot_T = start + jnp.arange(T)
        causal_TS = jnp.arange(S)[None, :] <= slot_T[:, None]
        mask_B1TS = (causal_TS[None, :, :] & valid_BS[:, None, :])[:, None]
        graphdef, stacked_state = nnx.split(self.blocks)

        def body(carry, layer):
            h_BTD, k_LBSKH, v_LBSKH = carry
            layer_state, index = layer
            block = nnx.merge(graphdef, layer_state)
            h_BTD, k_BSKH, v_BSKH = block.cached(
                h_BTD, cos_BTH, sin_BTH, mask_B1TS, k_LBSKH[index], v_LBSKH[index], start
            )
            k_LBSKH = jax.lax.dynamic_update_index_in_dim(k_LBSKH, k_BSKH, index, 0)
            v_LBSKH = jax.lax.dynamic_update_index_in_dim(v_LBSKH, v_BSKH, index, 0)
            return (constrain(h_BTD, ACTIVATION_AXES), k_LBSKH, v_LBSKH), None

        k, v = constrain(cache.k, CACHE_AXES), constrain(cache.v, CACHE_AXES)
        (h_BTD, k, v), _ = jax.lax.scan(
            body, (h_BTD, k, v), (stacked_state, jnp.arange(c.n_layers))
        )
        new_cache = KVCache(k=k, v=v, valid_BS=valid_BS, length=start + T)
        return self.norm_f(h_BTD), new_cache

    def embed(self, tokens_BT: jax.Array) -> jax.Array:
        """Token embeddings `[B, T, D]` in the compute dtype."""
        # Gather the FSDP shards of the table first (as for any weight); GSPMD then does the
        # lookup from the vocab-sharded table with a masked gather and a psum.
        table_VD = constrain(self.wte[...], ("vocab", "act_embed"))
        h_BTD = jnp.take(table_VD, tokens_BT, axis=0).astype(self.config.compute_dtype)
        return constrain(h_BTD, ACTIVATION_AXES)

    def logits(self, h_BTD: jax.Array) -> jax.Array:
        """lm_head on final-norm hidden states (from `extend`)."""
        logits = jnp.einsum(
            "BTD,DV->BTV", h_BTD, self.lm_head[...].astype(self.config.compute_dtype)
        )
        return constrain(logits, ("batch", "seq", "vocab"))

    def _run_blocks(self, h_BTD, cos_BTH, sin_BTH, mask_B1TS, jitter_key):
        """`lax.scan` over the stacked blocks, each optionally rematerialised."""
        graphdef, stacked_state = nnx.split(self.blocks)
        keys_L = None if jitter_key is None else jax.random.split(jitter_key, self.config.n_layers)

        def body(h_BTD, layer):
            layer_state, key = layer
            block = nnx.merge(graphdef, layer_state)
            return block(h_BTD, cos_BTH, sin_BTH, mask_B1TS, key)

        if self.config.remat_policy != "none":
            body = jax.checkpoint(
                body, policy=CHECKPOINT_POLICIES[self.config.remat_policy], prevent_cse=False
            )
        return jax.lax.scan(body, h_BTD, (stacked_state, keys_L))
