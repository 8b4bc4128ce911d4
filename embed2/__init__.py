"""embed2: native multimodal embedding models in JAX, trained the Gemini Embedding 2 way."""

__version__ = "0.1.0"
