"""The offline demo: PFT then FT of a small native multimodal encoder on text and code mined from
Python's stdlib and on generated images, audio, video and interleaved inputs.

  python -m embed2.main --config=configs/demo.py --workdir=/tmp/embed2_demo
  python -m embed2.main --config=configs/demo.py:pft_steps=20,ft_steps=20 --workdir=/tmp/quick

Tasks (data_pipelines/stdlib_tasks.py, held out by module): code search (docstring -> function source,
with a hard negative from the same module), doc retrieval (summary line -> docstring body), and module
classification (docstring -> one of 16 topic labels; many queries share a target, so the duplicate mask
matters). Evaluation: the held-out modules, against BM25 on the same split.

Multimodal tasks (data_pipelines/media_tasks.py, generated with a fixed seed, eval content held out):
captions -> images of shapes (t2i) and back (i2t), tone sequences -> descriptions (a2t), videos of moving
shapes -> descriptions (v2t), an image plus an edit instruction -> the edited image (edit), and audio
spelling a word in a tone alphabet -> the written word (spell). Images are 32x32 through the linear patch
frontend (16 soft tokens), audio 8 kHz log-mel through the conv frontend (25 soft tokens a second).
`media=false` trains the text-only demo.

`prepared=DIR` reads every task from the TFDS ArrayRecord datasets `python -m embed2.prepare` wrote
into DIR (local or gs://) instead of running the Python builders; the same examples, the same run:

  python -m embed2.prepare --task=stdlib_code_search,stdlib_doc_retrieval,stdlib_module_cls,\
      shapes_caption,shapes_caption_reversed,tone_description,moving_shapes,image_edit,tone_spelling \
      --data_dir=/tmp/embed2_tfds
  python -m embed2.main --config=configs/demo.py:prepared=/tmp/embed2_tfds --workdir=/tmp/embed2_demo
"""

from ml_collections import config_dict

from configs import common


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  k = common.parse_arg(arg, pft_steps=240, ft_steps=120, layers=2, dim=128, batch=64, lr=3e-3, seed=0,
                       soup=True, eval="demo", media=True, prepared="")
  c = config_dict.ConfigDict()
  c.seed = k.seed
  c.model = common.model("small", num_layers=k.layers, model_dim=k.dim, head_dim=k.dim // 4,
                         mlp_dim=3 * k.dim, head_dims=(k.dim,), mrl_dims=(k.dim // 4, k.dim // 2, k.dim),
                         max_length=256, max_segments=8)
  if k.media:
    c.model.media = MEDIA
  c.mesh = common.mesh()
  c.sharding_rules = common.sharding_rules()
  c.tokenizer = ""  # "" = the tokenizer shipped in embed2/assets
  c.loss = dict(kind="softmax", temperature=0.05, learnable_temperature=True, symmetric=False,
                blockwise=True, block_size=1024)

  c.tasks = config_dict.ConfigDict()
  c.tasks.code_search = dict(source="stdlib_code_search", task_string="task: code retrieval | query: ",
                             p_drop=0.1, batch_size=k.batch, query_len=128, positive_len=256,
                             negative_len=256, num_negatives=1, segments=8)
  c.tasks.doc_retrieval = dict(source="stdlib_doc_retrieval", task_string="task: search result | query: ",
                               p_drop=0.1, batch_size=k.batch, query_len=128, positive_len=256, segments=8)
  c.tasks.module_cls = dict(source="stdlib_module_cls", task_string="task: classification | query: ",
                            p_drop=0.1, batch_size=k.batch, query_len=128, positive_len=32, segments=8)

  if k.media:
    for name, task in media_tasks(k.batch).items():
      c.tasks[name] = task
  if k.prepared:  # each task's builder output, prepared: source tfds:embed2/<builder name>
    for task in c.tasks.values():
      task.source, task.data_dir = f"tfds:embed2/{task.source}", k.prepared

  pft = config_dict.ConfigDict()
  pft.name, pft.mode, pft.steps = "pft", "pft", k.pft_steps
  pft.tasks = dict(code_search=0.5, doc_retrieval=0.3, module_cls=0.2)
  if k.media:  # text keeps half the mixture
    pft.tasks = {**{n: r / 2 for n, r in pft.tasks.items()}, **MEDIA_RATES}
  pft.batch = dict(batch_size=2 * k.batch, query_len=MEDIA_QUERY_LEN if k.media else 128,
                   positive_len=256, segments=8)
  pft.optim = dict(learning_rate=k.lr, warmup_steps=max(k.pft_steps // 10, 1), decay="cosine",
                   final_lr_ratio=0.2, weight_decay=0.01)
  pft.freeze = ()
  # FT: the main run specialises in code search; the soup's variant specialises in documentation
  # (doc retrieval + classification). Each is in-domain on its own tasks and out-of-domain on the
  # other's; the soup of the two recovers both.
  ft = config_dict.ConfigDict()
  ft.name, ft.mode, ft.steps = "ft", "ft", k.ft_steps
  ft.tasks = dict(code_search=1.0, doc_retrieval=0.0, module_cls=0.0)
  if k.media:  # both FT runs keep the media tasks; they differ in their text tasks
    ft.tasks = {**{n: r / 2 for n, r in ft.tasks.items()}, **MEDIA_RATES}
  ft.optim = dict(learning_rate=k.lr / 2, warmup_steps=max(k.ft_steps // 10, 1), decay="cosine",
                  final_lr_ratio=0.1, weight_decay=0.01)
  ft.freeze = ()
  c.stages = [pft, ft]

  c.checkpoint = dict(every=50, keep=2, async_save=True)
  c.log_every = 10
  c.eval_every = 0  # 0 = at the end of each stage only
  c.eval_suite = k.eval  # "" = no evaluation
  c.max_consecutive_skips = 5
  c.data_groups = 0  # pack groups of the global batch; 0 = the number of data shards of the mesh
  # Decode threads of the input pipeline (0: the training thread decodes); the batches are the same
  # for any count, so a run may resume with another.
  c.data_workers = 0
  c.init_from = ""
  # The main job ends with a soup: each variant re-runs the last stage from the PFT parameters with
  # its overrides (tasks, seed, optim) in WORKDIR/variants/NAME; then WORKDIR/soup averages them all.
  docs = dict(code_search=0.0, doc_retrieval=0.6, module_cls=0.4)
  if k.media:
    docs = {**{n: r / 2 for n, r in docs.items()}, **MEDIA_RATES}
  c.soup = dict(method="uniform", variants=(dict(name="docs", seed=k.seed + 1, tasks=docs),)
                if k.soup else ())
  c.max_skipped_fraction = 0.01  # stop if more than 1% of the records cannot be decoded
  return c


# The media frontends and preprocessing of the demo model (`config.model.media`: the fields of
# embed2.model.presets.MediaConfig).
MEDIA = dict(image_frontend="patch", image_size=32, patch_size=8, image_tokens=16, audio_frontend="conv",
             sample_rate=8000, n_mels=32, n_fft=256, hop_length=80, audio_chunk_frames=100,
             max_audio_chunks=2, audio_conv_dim=128, video_fps=2.0, video_max_frames=4)
# Sampling rates of the media tasks (PFT share of examples, FT share of steps), half of the mixture.
MEDIA_RATES = dict(t2i=0.1, i2t=0.1, a2t=0.08, v2t=0.08, edit=0.07, spell=0.07)
# Longest query of the mixture: a video (4 frames x ~24 tokens + up to 2 s of audio) + task string.
MEDIA_QUERY_LEN = 192


def media_tasks(b: int) -> dict[str, dict]:
  """The generated multimodal tasks (data_pipelines/media_tasks.py), each with its FT batch shape.

  Media inputs have nearly fixed lengths (an image input is 20 tokens, an image query with its task
  string 30, a second of audio 27, a video query 106-158), so each side's row length is a multiple of
  its typical input: a row of 128 holds six 20-token images and wastes 8 tokens, a row of 160 holds
  eight (`python -m embed2.bench.packing`: the media FT streams pack 95-97%, against 89-93% with rows
  of 128). A video query fills most of a 160-token row (88%); two would need rows longer than the
  model's max_length.
  """
  common_kw = dict(p_drop=0.1, batch_size=b, segments=8)
  return {
      "t2i": dict(source="shapes_caption", task_string="task: image retrieval | query: ",
                  query_len=128, positive_len=160, **common_kw),
      "i2t": dict(source="shapes_caption_reversed", task_string="task: image captioning | query: ",
                  query_len=120, positive_len=64, **common_kw),
      "a2t": dict(source="tone_description", task_string="task: audio description | query: ",
                  query_len=256, positive_len=160, **common_kw),
      "v2t": dict(source="moving_shapes", task_string="task: video description | query: ",
                  query_len=160, positive_len=64, **common_kw),
      "edit": dict(source="image_edit", task_string="task: image editing | query: ",
                   query_len=256, positive_len=160, **common_kw),
      "spell": dict(source="tone_spelling", task_string="task: spoken word | query: ",
                    query_len=256, positive_len=56, **common_kw),
  }


def sweep(arg: str | None = None) -> list[dict]:
  """Fine-tuning learning rate x seed."""
  del arg
  return [{"seed": s, "stages[1].optim.learning_rate": lr} for s in (0, 1) for lr in (5e-4, 1e-3, 2e-3)]
