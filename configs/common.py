"""Blocks shared by the experiment configs.

Configs are ml_collections ConfigDicts built by `get_config(arg)` in one file per experiment; `arg` is a
comma-separated list of short knobs (`tiny.py:layers=4,dim=128`), parsed by `parse_arg`.
"""

from __future__ import annotations

from ml_collections import config_dict

from embed2 import sharding
from embed2.model import presets


def parse_arg(arg: str | None, **defaults):
  """`"a=1,b=x,flag"` -> ConfigDict(a=1, b="x", flag=True) over `defaults` (values typed like them)."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config knob {key!r}; known knobs: {sorted(defaults)}")
    if not eq:
      out[key] = True
      continue
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ("1", "true", "yes")
    elif defaults[key] is None:
      out[key] = value
    else:
      out[key] = kind(value)
  return config_dict.ConfigDict(out)


# Run-time knobs of the model (they change no parameter): always present in `config.model`, so the
# command line can set them on any config (`--config.model.attention_impl=blockwise`).
RUNTIME_KNOBS = ("attention_impl", "dtype", "remat")


def model(preset: str, **overrides) -> config_dict.ConfigDict:
  """`config.model`: a preset name plus field overrides (see embed2.model.presets.ModelConfig); the
  frontends and media preprocessing go in `media=dict(...)` (`MediaConfig` fields), which the command
  line reaches as `--config.model.media.image_size=...`. The run-time knobs (`RUNTIME_KNOBS`) are
  written out with the preset's values unless overridden."""
  base = presets.ModelConfig.from_name(preset)
  knobs = {k: getattr(base, k) for k in RUNTIME_KNOBS}
  return config_dict.ConfigDict(dict(preset=preset, **{**knobs, **overrides}))


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> config_dict.ConfigDict:
  """`config.mesh`: sizes of the (data, fsdp, tensor) axes; one may be -1 (fills the device count)."""
  return config_dict.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def sharding_rules():
  """`config.sharding_rules`: logical axis -> mesh axes. Short on purpose; edit per experiment."""
  return tuple(sharding.DEFAULT_RULES)


def stdlib_tasks(b: int) -> config_dict.ConfigDict:
  """`config.tasks` for the offline stdlib suite at base batch size `b`, with EmbeddingGemma-style task
  strings; the real-model configs share it until real datasets are plugged in."""
  tasks = config_dict.ConfigDict()
  tasks.code_search = dict(source="stdlib_code_search", task_string="task: code retrieval | query: ",
                           p_drop=0.1, batch_size=b, query_len=64, positive_len=256, negative_len=256,
                           num_negatives=1, segments=8)
  tasks.doc_retrieval = dict(source="stdlib_doc_retrieval", task_string="task: search result | query: ",
                             p_drop=0.1, batch_size=2 * b, query_len=48, positive_len=192, segments=8)
  tasks.module_cls = dict(source="stdlib_module_cls", task_string="task: classification | query: ",
                          p_drop=0.1, batch_size=b // 2, query_len=96, positive_len=16, segments=8)
  return tasks


def paper_stages(*, pft_steps: int, ft_steps: int, lr: float, pft_batch: int, pft_warmup_frac: float,
                 pft_final_lr_ratio: float, ft_lr: float) -> list[config_dict.ConfigDict]:
  """The paper's schedule over the stdlib tasks: PFT (every batch mixes the tasks at fixed rates, large
  batches for many in-batch negatives), then FT (each batch from one task, sampled by hand-set rates, at
  that task's own batch size)."""
  pft = config_dict.ConfigDict()
  pft.name, pft.mode, pft.steps = "pft", "pft", pft_steps
  pft.tasks = dict(code_search=0.4, doc_retrieval=0.4, module_cls=0.2)
  pft.batch = dict(batch_size=pft_batch, query_len=96, positive_len=256, segments=8)
  pft.optim = dict(learning_rate=lr, warmup_steps=max(int(pft_steps * pft_warmup_frac), 1), decay="cosine",
                   final_lr_ratio=pft_final_lr_ratio, weight_decay=0.01)
  pft.freeze = ()
  ft = config_dict.ConfigDict()
  ft.name, ft.mode, ft.steps = "ft", "ft", ft_steps
  ft.tasks = dict(code_search=0.5, doc_retrieval=0.3, module_cls=0.2)
  ft.optim = dict(learning_rate=ft_lr, warmup_steps=max(ft_steps // 20, 1), decay="cosine",
                  final_lr_ratio=0.1, weight_decay=0.01)
  ft.freeze = ()
  return [pft, ft]


def converted_gemma(k: config_dict.ConfigDict, model_cfg: config_dict.ConfigDict,
                    stages: list[config_dict.ConfigDict], *, save_every: int,
                    keep: int = 3) -> config_dict.ConfigDict:
  """A run that starts from a checkpoint `embed2.convert` wrote (`k.ckpt`), trains and evaluates with
  that checkpoint's own tokenizer, on the stdlib tasks at base batch `k.batch`, and ends with a soup of
  the run and a second-seed variant: the Gemma configs' shared body.

  Args:
    k: the config's knobs: ckpt, batch, seed, and the mesh sizes data / fsdp / tensor.
    model_cfg: `config.model` (see `model`).
    stages: `config.stages` (see `paper_stages`).
    save_every: steps between checkpoints, and between evaluations.
    keep: checkpoints kept.
  """
  c = config_dict.ConfigDict()
  c.seed = k.seed
  c.model = model_cfg
  c.mesh = mesh(k.data, k.fsdp, k.tensor)
  c.sharding_rules = sharding_rules()
  c.init_from = k.ckpt
  c.tokenizer = ""  # "": the tokenizer of config.init_from (the import carries its own)
  c.loss = dict(kind="softmax", temperature=0.05, learnable_temperature=True, symmetric=False,
                blockwise=True, block_size=1024)
  c.tasks = stdlib_tasks(k.batch)
  c.stages = stages
  c.checkpoint = dict(every=save_every, keep=keep, async_save=True)
  c.log_every = 10
  c.eval_every = save_every
  c.eval_suite = "demo"
  c.max_consecutive_skips = 5
  # Records skipped (media files missing at build, undecodable in training): at most this share.
  c.max_skipped_fraction = 0.01
  c.data_groups = 0  # pack groups of the global batch; 0 = the number of data shards of the mesh
  # Decode threads of the input pipeline (0: the training thread decodes); the batches are the same
  # for any count, so a run may resume with another.
  c.data_workers = 0
  c.soup = dict(method="uniform", variants=[dict(name="seed1", seed=k.seed + 1)])
  return c
