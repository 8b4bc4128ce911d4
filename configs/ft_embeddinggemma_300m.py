"""Fine-tune EmbeddingGemma-300M in the paper's two stages: PFT (large mixed batches), then FT (one task a
batch, per-task batch sizes), then a soup of the FT run and a second-seed variant.

  python -m embed2.convert --hf_dir=/ckpt/hf/embeddinggemma-300m --out=/ckpt/embeddinggemma-300m
  python -m embed2.main --config=configs/ft_embeddinggemma_300m.py:ckpt=/ckpt/embeddinggemma-300m \
      --workdir=/tmp/eg300m
  python -m embed2.main --config=configs/ft_embeddinggemma_300m.py:ckpt=DIR,pft_steps=20,ft_steps=20,batch=32 \
      --workdir=/tmp/eg300m_quick

`ckpt` is the directory `embed2.convert` wrote from the Hugging Face sentence-transformers folder: the
backbone, the 768 -> 3072 -> 768 dense head and the model's own tokenizer (the run trains with it:
config.tokenizer is empty). EmbeddingGemma is already an
encoder, so this run starts from it with small learning rates and a short PFT.

Tasks are the offline stdlib suite (data_pipelines/stdlib_tasks.py) until real datasets are plugged in
(a TFDS builder or manifest per task, named in `source`). Task strings follow EmbeddingGemma's prompts
("task: ... | query: "); embed2 prepends them to queries only, while EmbeddingGemma's own document
prompt is "title: none | text: ".
"""

from ml_collections import config_dict

from configs import common


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  k = common.parse_arg(arg, ckpt="/ckpt/embeddinggemma-300m", pft_steps=500, ft_steps=1000, batch=128,
                       lr=2e-5, seed=0, max_length=512, data=-1, fsdp=1, tensor=1, dtype="bfloat16",
                       remat="dots")
  # sliding_window=257: transformers' bidirectional window for the checkpoint's 512 (|i - j| <= 256);
  # see embed2.convert. The checkpoint's architecture must match this one for init_from to load it.
  model = common.model("embeddinggemma-300m", sliding_window=257, max_length=k.max_length,
                       max_segments=8, dtype=k.dtype, remat=k.remat,
                       attention_impl="auto")
  stages = common.paper_stages(pft_steps=k.pft_steps, ft_steps=k.ft_steps, lr=k.lr, pft_batch=4 * k.batch,
                               pft_warmup_frac=0.1, pft_final_lr_ratio=0.5, ft_lr=k.lr / 2)
  return common.converted_gemma(k, model, stages, save_every=250)


def sweep(arg: str | None = None) -> list[dict]:
  """FT learning rate x seed."""
  del arg
  return [{"seed": s, "stages[1].optim.learning_rate": lr} for s in (0, 1) for lr in (5e-6, 1e-5, 2e-5)]
