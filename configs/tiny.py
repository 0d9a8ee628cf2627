"""The unit-test model (dbrx-tiny: 2 layers, d_model 64, 16 experts top-4, vocab 512).

    python experiments/model_info.py --config=configs/tiny.py --time
prints its size (682K parameters, 240K active per token) and times a jitted forward.
"""

import ml_collections

from dbrx_jax import DbrxConfig


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = DbrxConfig.preset("dbrx-tiny").to_config_dict()
    config.seed = 0
    return config
