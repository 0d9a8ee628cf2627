"""The DBRX model in Flax NNX.

    layers.py  bias-free LayerNorm, NeoX RoPE, fused-QKV GQA attention (with a KV cache)
    block.py   one pre-LN block: attention, then the MoE (dbrx_jax/moe/)
    dbrx.py    `Dbrx`: embedding, a scan over the blocks, final norm, lm_head; `KVCache`

Shape legend, for the whole package. An array's name ends in its shape, one capital letter per
dimension (`x_BTD`, `w1_EDF`, `logits_LBTE`); einsum strings use the same letters. Every letter
means one thing:

    A  active experts of a token (top_k slots)     M  tokens of a batch, flattened (B * T)
    B  batch rows                                  N  query heads (K * G)
    C  slots per group of a slotted row layout     O  output features of a grouped GEMM
       (capacity per expert, or per destination    P  rows of a row layout (dispatched tokens)
       device in the all-to-all)                   Q  devices along the `expert` mesh axis
    D  d_model                                     R  (token, slot) assignments (M * A)
    E  experts                                     S  key/value positions (KV-cache slots)
    F  expert hidden size (ffn_hidden_size)        T  tokens of a row (queries)
    G  query heads per KV head                     U  groups of a row layout (experts, or
    H  head dim                                       destination devices)
    I  input features of a grouped GEMM            V  vocabulary
    J  fused-QKV slots per KV head (G + 2)         W  blocks of rows (the CPU grouped GEMM)
    K  KV heads                                    X  new tokens of generation
    L  layers
"""

from dbrx_jax.model.dbrx import Dbrx, DbrxOutput, KVCache

__all__ = ["Dbrx", "DbrxOutput", "KVCache"]
