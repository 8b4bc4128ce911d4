"""Size presets: instantiated abstractly (no memory), counted against the published Gemma 3 counts."""

import jax
import numpy as np
import pytest
from flax import nnx

from embed2.model import PRESETS, EmbeddingModel, ModelConfig

# Published parameter counts (Hugging Face model cards / safetensors metadata of google/gemma-3-*,
# google/embeddinggemma-300m). gemma3-4b: the language model only (the SigLIP tower is separate).
PUBLISHED = {
    "gemma3-270m": 268_098_176,
    "gemma3-1b": 999_885_952,
    "gemma3-4b": 3_880_263_168,
    "embeddinggemma-300m": 307_581_696,
}


def abstract_count(cfg):
  model = nnx.eval_shape(lambda: EmbeddingModel(cfg, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing was allocated
  return sum(int(np.prod(x.shape)) for x in leaves)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_instantiates_abstractly(name):
  cfg = ModelConfig.from_name(name)
  n = abstract_count(cfg)
  assert n > 0
  if name in PUBLISHED:
    assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < 0.01, (name, n, PUBLISHED[name])


def test_overrides_apply():
  cfg = ModelConfig.from_name("gemma3-1b", num_layers=2)
  assert cfg.num_layers == 2 and cfg.model_dim == 1152
  assert [cfg.is_global_layer(i) for i in range(12)] == [False] * 5 + [True] + [False] * 5 + [True]
