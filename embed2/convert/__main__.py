"""Hugging Face Gemma 3 / EmbeddingGemma checkpoints <-> embed2 checkpoints (see embed2/convert/).

Import (safetensors -> an embed2 parameters-only checkpoint that `config.init_from` and
`Embedder.from_checkpoint` load):

  python -m embed2.convert --hf_dir=/ckpt/hf/embeddinggemma-300m --out=/ckpt/embeddinggemma-300m
  python -m embed2.convert --hf_dir=/ckpt/hf/gemma-3-1b-pt --out=/ckpt/gemma3-1b
  python -m embed2.convert --hf_dir=/ckpt/hf/gemma-3-4b-pt --out=/ckpt/gemma3-4b --dtype=bfloat16 \\
      --mesh=fsdp=-1 [--text_only]

Export (the text encoder of an embed2 checkpoint -> a sentence-transformers folder):

  python -m embed2.convert --to_safetensors --ckpt=WORKDIR/stages/ft --out=/ckpt/st/my-model \\
      [--dtype=bfloat16] [--hf_tokenizer=DIR]

A refusal (an unsupported architecture; a missing, unexpected or mis-shaped tensor; a tokenizer embed2
cannot reproduce; a non-empty --out) exits with the reason and writes nothing.
"""

from embed2 import cli
from embed2.convert import program

cli.run(program.main, program.FLAGS)
