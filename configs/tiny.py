"""A tiny model for tests and a first forward pass.

  python -c "from configs import tiny; print(tiny.get_config('layers=4'))"
"""

from ml_collections import config_dict

from configs import common


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  knobs = common.parse_arg(arg, layers=2, dim=64, seed=0)
  config = config_dict.ConfigDict()
  config.seed = knobs.seed
  config.model = common.model("tiny", num_layers=knobs.layers, model_dim=knobs.dim,
                              head_dims=(knobs.dim,), mrl_dims=(knobs.dim // 4, knobs.dim // 2, knobs.dim))
  config.mesh = common.mesh()
  config.sharding_rules = common.sharding_rules()
  return config
