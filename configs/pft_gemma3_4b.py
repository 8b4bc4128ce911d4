"""Turn multimodal Gemma 3 4B into an embedding model: PFT (large mixed batches), then FT (one task a
batch, per-task batch sizes), then a soup of the FT run and a second-seed variant, as in the paper.

  python -m embed2.convert --hf_dir=/ckpt/hf/gemma-3-4b-pt --out=/ckpt/gemma3-4b --dtype=bfloat16
  python -m embed2.main --config=configs/pft_gemma3_4b.py:ckpt=/ckpt/gemma3-4b --workdir=/tmp/g4b
  python -m embed2.main --config=configs/pft_gemma3_4b.py:ckpt=DIR,fsdp=-1,data=1 --workdir=/tmp/g4b

`ckpt` is the directory `embed2.convert` wrote from Gemma3ForConditionalGeneration: the language model
(CKPT/0, loaded by `init_from`), the SigLIP tower and projector (CKPT/vision, `vision_init_from`), and
Gemma's own tokenizer (the run's: config.tokenizer is empty). Parameters are sharded over `fsdp` (all devices by default; the 4B model and
its AdamW state do not fit one device's memory replicated).

The model's image frontend is Gemma 3's own (`media.image_frontend="vit"`: SigLIP So400m/14 at 896 px, 256
soft tokens per image), initialised from the converted weights (`config.vision_init_from`); the language
model comes from `init_from`. The tasks here are the offline text/code suite
(data_pipelines/stdlib_tasks.py); image tasks (e.g. `coco_captions`, `flickr30k` from
data_pipelines/media_datasets.py) join the same stage schedule with their own rates and batch sizes.
"""

from ml_collections import config_dict

from configs import common
from embed2.model.vision import VisionConfig


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  k = common.parse_arg(arg, ckpt="/ckpt/gemma3-4b", pft_steps=2000, ft_steps=1000, batch=128, lr=5e-5,
                       seed=0, max_length=512, data=1, fsdp=-1, tensor=1, dtype="bfloat16", remat="full")
  v = VisionConfig()  # Gemma 3 4B/12B/27B's SigLIP
  media = dict(image_frontend="vit", image_size=v.image_size, patch_size=v.patch_size,
               image_tokens=v.mm_tokens_per_image, vit_width=v.width, vit_depth=v.depth, vit_heads=v.num_heads,
               vit_mlp_dim=v.mlp_dim)
  model = common.model("gemma3-4b", causal=False, mrl_dims=(256, 768, 1536, 2560), max_length=k.max_length,
                       max_segments=8, dtype=k.dtype, remat=k.remat,
                       attention_impl="auto", media=media)
  stages = common.paper_stages(pft_steps=k.pft_steps, ft_steps=k.ft_steps, lr=k.lr, pft_batch=8 * k.batch,
                               pft_warmup_frac=0.05, pft_final_lr_ratio=0.1, ft_lr=k.lr / 5)
  c = common.converted_gemma(k, model, stages, save_every=500, keep=2)
  c.vision_init_from = f"{k.ckpt}/vision"
  return c


def sweep(arg: str | None = None) -> list[dict]:
  """PFT learning rate x seed."""
  del arg
  return [{"seed": s, "stages[0].optim.learning_rate": lr} for s in (0, 1) for lr in (2e-5, 5e-5, 1e-4)]
