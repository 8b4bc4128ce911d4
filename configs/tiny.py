"""A tiny model and a two-stage run on generated tasks: tests, and a first look in seconds.

  python -m embed2.main --config=configs/tiny.py --workdir=/tmp/tiny
  python -m embed2.main --config=configs/tiny.py:pft_steps=4,ft_steps=6,every=2 --workdir=/tmp/tiny
  python -m embed2.main --config=configs/tiny.py:soup --workdir=/tmp/tiny_soup   # + a variant and a soup
"""

from ml_collections import config_dict

from configs import common


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  k = common.parse_arg(arg, layers=2, dim=64, seed=0, pft_steps=4, ft_steps=6, every=2, batch=16,
                       data=-1, fsdp=1, tensor=1, eval="", lr=3e-3, soup=False)
  c = config_dict.ConfigDict()
  c.seed = k.seed
  c.model = common.model("tiny", num_layers=k.layers, model_dim=k.dim, head_dims=(k.dim,),
                         mrl_dims=(k.dim // 4, k.dim // 2, k.dim), vocab_size=8192, max_length=64,
                         max_segments=4)
  c.mesh = common.mesh(k.data, k.fsdp, k.tensor)
  c.sharding_rules = common.sharding_rules()
  c.tokenizer = ""
  c.loss = dict(kind="softmax", temperature=0.05, learnable_temperature=True)

  c.tasks = config_dict.ConfigDict()
  c.tasks.pairs = dict(source="synthetic_pairs", task_string="query: ", p_drop=0.1, batch_size=k.batch,
                       query_len=32, positive_len=32, negative_len=32, num_negatives=1, segments=4)
  c.tasks.labels = dict(source="synthetic_labels", task_string="classify: ", p_drop=0.0,
                        batch_size=k.batch // 2, query_len=32, positive_len=16, segments=4)

  pft = config_dict.ConfigDict()
  pft.name, pft.mode, pft.steps = "pft", "pft", k.pft_steps
  pft.tasks = dict(pairs=0.7, labels=0.3)
  pft.batch = dict(batch_size=2 * k.batch, query_len=32, positive_len=32, segments=4)
  pft.optim = dict(learning_rate=k.lr, warmup_steps=1)
  pft.freeze = ()
  ft = config_dict.ConfigDict()
  ft.name, ft.mode, ft.steps = "ft", "ft", k.ft_steps
  ft.tasks = dict(pairs=0.6, labels=0.4)
  ft.optim = dict(learning_rate=k.lr / 2, warmup_steps=1)
  ft.freeze = ()
  c.stages = [pft, ft]

  c.checkpoint = dict(every=k.every, keep=3, async_save=True)
  c.log_every = 1
  c.eval_every = 0
  c.eval_suite = k.eval
  c.max_consecutive_skips = 3
  # Records skipped (media files missing at build, undecodable in training): at most this share.
  c.max_skipped_fraction = 0.01
  c.data_groups = 0  # pack groups of the global batch; 0 = the number of data shards of the mesh
  # Decode threads of the input pipeline (0: the training thread decodes); the batches are the same
  # for any count, so a run may resume with another.
  c.data_workers = 0
  c.init_from = ""
  # soup: one fine-tuning variant (another seed and task mix) souped with the main run.
  c.soup = dict(method="uniform", variants=(
      dict(name="alt", seed=k.seed + 1, tasks=dict(pairs=0.3, labels=0.7)),) if k.soup else ())
  return c


def sweep(arg: str | None = None) -> list[dict]:
  """Two seeds and two fine-tuning learning rates."""
  del arg
  return [{"seed": s, "stages[1].optim.learning_rate": lr} for s in (0, 1) for lr in (1e-3, 3e-3)]
