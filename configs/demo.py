"""The CPU demo model (dbrx-small: 4 layers, d_model 256, 16 experts top-4, vocab 8192).

    python experiments/model_info.py --config=configs/demo.py --time
Any model field can be overridden, e.g. `--config.model.n_layers=8`.
"""

import ml_collections

from dbrx_jax import DbrxConfig


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = DbrxConfig.preset("dbrx-small").to_config_dict()
    config.seed = 0
    return config
