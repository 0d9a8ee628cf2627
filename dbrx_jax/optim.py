"""The optimizer: AdamW or decoupled Lion, warmup + cosine decay, global-norm clipping, and no
weight decay on norms and embeddings."""

from __future__ import annotations

import jax
import ml_collections
import optax

_NO_DECAY = ("norm_1", "norm_2", "norm_f", "wte")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 to the peak, cosine decay to min_lr_ratio * peak at total_steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.total_steps,
        end_value=config.learning_rate * config.min_lr_ratio,
    )


def decay_mask(params):
    """True for the parameters weight decay applies to: all but norm scales and embeddings."""

    def decays(path, _):
        names = {getattr(key, "key", getattr(key, "name", None)) for key in path}
        return not names & set(_NO_DECAY)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(config)
    if config.optimizer == "adamw":
        update = optax.adamw(
            schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=decay_mask
        )
    elif config.optimizer == "lion":
        update = optax.lion(
            schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=decay_mask
        )
    else:
        raise ValueError(f"config.optimizer={config.optimizer!r}: expected 'adamw' or 'lion'")
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), update)
