"""The encoder: presets, the Gemma 3 transformer, pooling and the embedding head."""

from embed2.model.embedding_model import EmbeddingModel, gather_slots, l2_normalize, mean_pool, mrl_truncate
from embed2.model.presets import PRESETS, ModelConfig
from embed2.model.transformer import Transformer, check_inputs
