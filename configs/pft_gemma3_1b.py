"""Turn the Gemma 3 1B decoder into an embedding model: PFT (large mixed batches), then FT (one task a
batch, per-task batch sizes), then a soup of the FT run and a second-seed variant, as in the paper.

  python -m embed2.convert --hf_dir=/ckpt/hf/gemma-3-1b-pt --out=/ckpt/gemma3-1b
  python -m embed2.main --config=configs/pft_gemma3_1b.py:ckpt=/ckpt/gemma3-1b --workdir=/tmp/g1b
  python -m embed2.main --config=configs/pft_gemma3_1b.py:ckpt=DIR,pft_steps=20,ft_steps=20,batch=32 \
      --workdir=/tmp/g1b_quick

`ckpt` is the directory `embed2.convert` wrote from the Hugging Face checkpoint (causal weights and
Gemma's own tokenizer, which the run trains with). The model keeps the decoder's weights and attends bidirectionally from the
first step (`causal` does not change the parameters, so the causal checkpoint loads); the embedding is
the mean-pooled final state (no projection head: a converted decoder has none to start from, and
`init_from` loads every parameter of the model), with MRL prefixes of it.

Tasks are the offline stdlib suite (data_pipelines/stdlib_tasks.py) until real datasets are plugged in.
"""

from ml_collections import config_dict

from configs import common


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  k = common.parse_arg(arg, ckpt="/ckpt/gemma3-1b", pft_steps=2000, ft_steps=1000, batch=128, lr=1e-4,
                       seed=0, max_length=512, data=-1, fsdp=1, tensor=1, dtype="bfloat16", remat="dots")
  model = common.model("gemma3-1b", causal=False, mrl_dims=(128, 256, 512, 1152), max_length=k.max_length,
                       max_segments=8, dtype=k.dtype, remat=k.remat,
                       attention_impl="auto")
  stages = common.paper_stages(pft_steps=k.pft_steps, ft_steps=k.ft_steps, lr=k.lr, pft_batch=8 * k.batch,
                               pft_warmup_frac=0.05, pft_final_lr_ratio=0.1, ft_lr=k.lr / 5)
  return common.converted_gemma(k, model, stages, save_every=500)


def sweep(arg: str | None = None) -> list[dict]:
  """PFT learning rate x FT learning rate."""
  del arg
  return [{"stages[0].optim.learning_rate": p, "stages[1].optim.learning_rate": f}
          for p in (5e-5, 1e-4, 2e-4) for f in (1e-5, 2e-5)]
