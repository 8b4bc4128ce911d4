"""embed2 vs the tools users would pick instead: sentence-transformers inference and a PyTorch train step,
on the same EmbeddingGemma-shaped model (random weights, one config) and the same inputs.

    python -m embed2.bench.vs_peers                          # 4 layers of the embeddinggemma-300m shape
    python -m embed2.bench.vs_peers --layers=24 --vocab=262144   # its full shape (slow on a CPU)
    python -m embed2.bench.vs_peers --bucket_step=16 --no_train  # finer Embedder length buckets
    python -m embed2.bench.vs_peers --toy --out=/tmp/vs_peers.json

The model. A transformers `Gemma3TextModel` with `use_bidirectional_attention=True` and random weights
(norm scales randomised too, so a mis-mapped norm shows), its config written by
`embed2.convert.hf_config_from_model_config` from the embed2 preset; a `SentenceTransformer` of it +
mean Pooling + Dense(768 -> 3072) + Dense(3072 -> 768) (bias-free, identity) + Normalize, saved to a
temporary folder and loaded back offline, as a user loads EmbeddingGemma. embed2 reads the same folder
through `embed2.convert.convert_hf` and `Embedder.from_checkpoint`. The vocabulary is cut to --vocab
(default 32768) so that a CPU train step is not mostly AdamW on the 262144 x 768 table; the blocks,
heads and head stack are the preset's.

The inputs. Texts of random words from a word-level tokenizer that both sides hold: a `tokenizers`
WordLevel model (with <bos> ... <eos>) for sentence-transformers, the same map for embed2's pipeline
`Tokenize`; the token ids are checked equal first.

Inference: `Embedder.embed(texts)` (sorted by length, batches of --batch_size padded to length buckets,
one compiled function per bucket) vs `SentenceTransformer.encode(texts, batch_size=--batch_size)`
(sorted by length, padded to each batch's longest). The outputs are compared first: the max abs
difference must be < --tol (1e-4, float32) or no speed is reported. Then rounds of both, interleaved,
and the median over rounds of t(sentence-transformers) / t(embed2).

Train step: embed2's compiled step (`StepFunctions`: blockwise NCE over in-batch negatives, fixed
temperature, AdamW with global-norm clipping and the non-finite guard) vs the PyTorch equivalent (the
same transformers model, mean pooling, the two Dense layers, L2 normalisation, cross-entropy over
q @ p^T / tau with the diagonal as positives, clip_grad_norm_, torch.optim.AdamW with the same
hyper-parameters and weight decay on matrices only), at the same B and L (one example per row, the
same token ids). The first step's loss and gradient norm are compared first (|loss diff| < --tol,
relative grad-norm diff < 1e-3), then interleaved rounds and the median ratio.

Threads: torch.set_num_threads(--threads, default all cores); XLA's CPU client uses all cores by
default. Both run in this one process, one after the other, never at once. torch is also timed at
--torch_threads_also (default 1 thread) as extra contenders: on a shared, loaded CPU its OpenMP pool
can be far slower with all cores than with one, so besides the equal-threads ratio (`speedup`) the
JSON gives the ratio against torch's fastest setting (`speedup_vs_fastest_torch`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Sequence

import numpy as np
from absl import flags

from embed2 import cli
from embed2.bench import common
from embed2.bench import train_step as ts

_SPECIAL = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}


FLAGS = common.program_flags("vs_peers")  # --out, --toy, and this program's own:
flags.DEFINE_integer("layers", 4, "blocks of the embeddinggemma-300m shape", flag_values=FLAGS)
flags.DEFINE_integer("vocab", 32768, "vocabulary size (preset: 262144)", flag_values=FLAGS)
flags.DEFINE_integer("texts", 128, "inputs per inference round", flag_values=FLAGS)
flags.DEFINE_float("words", 40, "median words per text (log-normal)", flag_values=FLAGS)
flags.DEFINE_integer("max_len", 128, "tokens per input at most (bos/eos incl.)", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 32, "inference batch, both tools", flag_values=FLAGS)
flags.DEFINE_integer("bucket_step", 0,
                     "Embedder length buckets every this many tokens (0 = its default 32, 64, ...)",
                     flag_values=FLAGS)
flags.DEFINE_integer("repeats", 5, "timed inference rounds", flag_values=FLAGS)
flags.DEFINE_integer("train_batch", 8, "B of the train step", flag_values=FLAGS)
flags.DEFINE_integer("train_seq", 64, "L of the train step", flag_values=FLAGS)
flags.DEFINE_integer("train_repeats", 5, "timed train rounds", flag_values=FLAGS)
flags.DEFINE_bool("no_train", False, "skip the train-step comparison", flag_values=FLAGS)
flags.DEFINE_float("temperature", 0.05, "loss temperature, both tools", flag_values=FLAGS)
flags.DEFINE_float("lr", 1e-4, "AdamW learning rate, both tools", flag_values=FLAGS)
flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay (matrices), both tools", flag_values=FLAGS)
flags.DEFINE_integer("threads", 0, "torch threads (0 = os.cpu_count())", flag_values=FLAGS)
flags.DEFINE_string("torch_threads_also", "1",
                    "comma-separated other torch thread counts timed as extra contenders ('' = none)",
                    flag_values=FLAGS)
flags.DEFINE_float("tol", 1e-4, "max abs difference allowed (float32)", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the weights and texts", flag_values=FLAGS)


def _args(argv: Sequence[str]) -> cli.Args:
  args = cli.parse(FLAGS, argv)
  if args.toy:
    args.texts, args.words, args.max_len, args.batch_size, args.repeats = 16, 8, 32, 8, 1
    args.train_batch, args.train_seq, args.train_repeats = 8, 16, 1
  args.threads = args.threads or os.cpu_count()
  args.torch_threads_also = sorted({int(n) for n in args.torch_threads_also.split(",") if n} -
                                   {args.threads})
  return args


def _torch_contenders(args, name: str, fn) -> dict[str, Any]:
  """name -> fn run at --threads torch threads, plus name_Nthreads for each --torch_threads_also."""
  import torch  # pylint: disable=g-import-not-at-top

  def at(n):
    def call():
      torch.set_num_threads(n)
      return fn()
    return call

  out = {name: at(args.threads)}
  out.update({f"{name}_{n}threads": at(n) for n in args.torch_threads_also})
  return out


def _speedups(times: dict[str, list[float]], ours: str, theirs: str) -> dict[str, Any]:
  """Median paired ratio vs the equal-threads contender, and vs the fastest of the torch contenders."""
  others = [n for n in times if n.startswith(theirs)]
  best = min(others, key=lambda n: common.summary(times[n])["median_s"])
  return {"speedup": common.median_ratio(times[theirs], times[ours]),
          "speedup_vs_fastest_torch": common.median_ratio(times[best], times[ours]),
          "fastest_torch": best}


def model_config(args):
  """The embed2 ModelConfig both sides build: embeddinggemma-300m's shape (a toy shape with --toy)."""
  from embed2.model import ModelConfig  # pylint: disable=g-import-not-at-top
  if args.toy:
    return ModelConfig(name="toy", vocab_size=8192, model_dim=64, num_layers=2, num_heads=2,
                       num_kv_heads=1, head_dim=32, mlp_dim=128, sliding_window=9, global_every=2,
                       max_length=64, head_dims=(128, 64))
  return ModelConfig.from_name("embeddinggemma-300m", num_layers=args.layers, vocab_size=args.vocab,
                               max_length=max(args.max_len, args.train_seq, 512))


# ------------------------------------------------------------------------------------ tokenizer


class WordTokenizer:
  """Whitespace-split words -> ids of a fixed vocabulary (unknown words -> <unk>); embed2's side."""

  def __init__(self, vocab: dict[str, int]):
    self.vocab = dict(vocab)
    self.vocab_size = max(self.vocab.values()) + 1

  def encode(self, text: str, **unused) -> list[int]:
    unk = _SPECIAL["<unk>"]
    return [self.vocab.get(w, unk) for w in text.split()]


def word_vocab(size: int) -> dict[str, int]:
  """<pad> <eos> <bos> <unk> (Gemma's ids 0..3), then words w0, w1, ... up to `size` ids."""
  vocab = dict(_SPECIAL)
  vocab.update({f"w{i}": len(_SPECIAL) + i for i in range(size - len(_SPECIAL))})
  return vocab


def hf_tokenizer(vocab: dict[str, int], max_len: int):
  """The same map as a transformers fast tokenizer that adds <bos> ... <eos> and pads on the right."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tk.post_processor = processors.TemplateProcessing(
      single="<bos> $A <eos>", special_tokens=[("<bos>", _SPECIAL["<bos>"]), ("<eos>", _SPECIAL["<eos>"])])
  return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                 pad_token="<pad>", unk_token="<unk>", model_max_length=max_len,
                                 padding_side="right")


def make_texts(rng: np.random.Generator, n: int, *, vocab_size: int, median_words: float,
               max_words: int) -> list[str]:
  """n texts of log-normal word counts; words Zipf-like over the vocabulary (no <unk>)."""
  lengths = common.lognormal_lengths(rng, n, median_words, 0.6, max_words, min_len=1)
  n_words = vocab_size - len(_SPECIAL)
  out = []
  for m in lengths:
    ids = np.minimum(rng.zipf(1.2, m) - 1, n_words - 1)
    out.append(" ".join(f"w{i}" for i in ids))
  return out


# -------------------------------------------------------------------------------------- models


def build_sentence_transformer(cfg, folder: str, *, max_len: int, vocab: dict[str, int], seed: int
                               ) -> str:
  """Writes a random EmbeddingGemma-like sentence-transformers folder for `cfg`; returns its path."""
  import torch  # pylint: disable=g-import-not-at-top
  from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
  from sentence_transformers.sentence_transformer import modules  # pylint: disable=g-import-not-at-top
  from transformers import Gemma3TextConfig, Gemma3TextModel  # pylint: disable=g-import-not-at-top
  from embed2 import convert  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  hf_cfg = Gemma3TextConfig.from_dict(convert.hf_config_from_model_config(cfg))
  backbone = Gemma3TextModel(hf_cfg)
  with torch.no_grad():
    for name, p in backbone.named_parameters():
      if name.endswith("norm.weight"):  # zeros at init; random so that a mis-mapped norm shows
        p.normal_(0.0, 0.2)
  hf_dir = os.path.join(folder, "hf")
  backbone.save_pretrained(hf_dir)
  hf_tokenizer(vocab, max_len).save_pretrained(hf_dir)
  dims = (cfg.model_dim,) + tuple(cfg.head_dims)
  mods = [modules.Transformer(hf_dir, max_seq_length=max_len,
                              model_kwargs={"attn_implementation": "sdpa"}),
          modules.Pooling(cfg.model_dim, "mean")]
  mods += [modules.Dense(a, b, bias=False, activation_function=torch.nn.Identity())
           for a, b in zip(dims[:-1], dims[1:])]
  mods.append(modules.Normalize())
  st_dir = os.path.join(folder, "st")
  SentenceTransformer(modules=mods, device="cpu").save(st_dir)
  return st_dir


def load_models(args, cfg, folder: str):
  """(SentenceTransformer, embed2 Embedder) of the same folder, and the word vocabulary."""
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  import torch  # pylint: disable=g-import-not-at-top
  from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
  from embed2 import convert  # pylint: disable=g-import-not-at-top
  from embed2.inference import Embedder  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.threads)
  vocab = word_vocab(cfg.vocab_size)
  st_dir = build_sentence_transformer(cfg, folder, max_len=args.max_len, vocab=vocab, seed=args.seed)
  st = SentenceTransformer(st_dir, device="cpu", local_files_only=True)
  st.eval()
  ckpt = os.path.join(folder, "embed2")
  convert.convert_hf(st_dir, ckpt)
  loaded = Embedder.from_checkpoint(ckpt)
  got = loaded.config.replace(name=cfg.name, mrl_dims=cfg.mrl_dims)
  layers = range(cfg.num_layers)
  if [got.is_global_layer(i) for i in layers] == [cfg.is_global_layer(i) for i in layers]:
    got = got.replace(global_every=cfg.global_every)  # e.g. 4 layers, none global: any k > 4 says so
  if got != cfg.replace(max_length=got.max_length, max_segments=got.max_segments):
    raise AssertionError(f"the converted model's config differs from the one built:\n{got}\n{cfg}")
  buckets = tuple(range(args.bucket_step, args.max_len + 1, args.bucket_step)) if args.bucket_step else None
  embedder = Embedder(loaded.model, WordTokenizer(vocab), max_length=args.max_len,
                      batch_size=args.batch_size, buckets=buckets, mesh=loaded.mesh)
  return st, embedder, vocab


# ----------------------------------------------------------------------------------- inference


def bench_inference(args, st, embedder, texts: list[str]) -> dict[str, Any]:
  """Checks equal token ids and embeddings, then times both tools round-robin."""
  ids_st = st.tokenizer(texts)["input_ids"]
  ids_e2 = [t.tolist() for t in embedder.tokenize(texts)]
  if ids_st != ids_e2:
    bad = next(i for i, (a, b) in enumerate(zip(ids_st, ids_e2)) if a != b)
    raise AssertionError(f"token ids differ at text {bad}: {ids_st[bad][:10]} vs {ids_e2[bad][:10]}")
  e_e2 = embedder.embed(texts)
  e_st = st.encode(texts, batch_size=args.batch_size, convert_to_numpy=True, show_progress_bar=False)
  diff = float(np.max(np.abs(e_e2 - e_st)))
  tokens = sum(len(t) for t in ids_e2)
  out = {"texts": len(texts), "tokens": tokens, "batch_size": args.batch_size,
         "max_abs_diff": diff, "tol": args.tol, "buckets": list(embedder.buckets)}
  if not diff < args.tol:
    out["refused"] = (f"outputs differ by {diff:.3g} >= tol {args.tol}: no speed is reported until "
                      "the models agree")
    return out
  fns = {"embed2": lambda: embedder.embed(texts)}
  fns.update(_torch_contenders(args, "sentence_transformers", lambda: st.encode(
      texts, batch_size=args.batch_size, convert_to_numpy=True, show_progress_bar=False)))
  times = common.interleaved(fns, repeats=args.repeats, warmup=1)
  for name, t in times.items():
    s = common.summary(t)
    out[name] = {"time_s": s, "texts_per_s": len(texts) / s["median_s"],
                 "tokens_per_s": tokens / s["median_s"]}
  out.update(_speedups(times, "embed2", "sentence_transformers"))
  return out


# ---------------------------------------------------------------------------------- train step


def train_batch(args, vocab, rng, num_groups: int) -> dict[str, np.ndarray]:
  """A padded host batch (one example per row, L = --train_seq) of query/positive texts."""
  from embed2.data.packing import GroupShape, SideShape  # pylint: disable=g-import-not-at-top
  b, l = args.train_batch, args.train_seq
  if b % num_groups:
    raise ValueError(f"--train_batch={b} must be a multiple of the {num_groups} batch shards")
  tok = WordTokenizer(vocab)
  texts = make_texts(rng, 2 * b, vocab_size=len(vocab), median_words=0.5 * l, max_words=l - 2)

  def ids(t):
    return np.asarray([_SPECIAL["<bos>"]] + tok.encode(t) + [_SPECIAL["<eos>"]], np.int32)

  tuples = [{"query_tokens": ids(texts[2 * i]), "positive_tokens": ids(texts[2 * i + 1]),
             "negative_tokens": [], "query_id": i, "positive_id": i} for i in range(b)]
  g_rows = b // num_groups
  shape = GroupShape(examples=g_rows, segments=1, num_negatives=0,
                     query=SideShape(length=l, rows=g_rows), positive=SideShape(length=l, rows=g_rows))
  host = ts.pack_batch(shape, tuples, num_groups)
  if int(host["num_examples"]) != b:
    raise AssertionError(f"packed {int(host['num_examples'])} of {b} examples")
  return host


def torch_inputs(host: dict[str, np.ndarray], side: str, num_groups: int):
  """(ids, mask) int64 (B, L) of one side, rows in example order (slot -> row, S = 1)."""
  import torch  # pylint: disable=g-import-not-at-top
  slot = host[f"{side}_slot"]
  b_g = slot.shape[0] // num_groups
  r_g = host[f"{side}_tokens"].shape[0] // num_groups
  rows = slot + (np.arange(slot.shape[0]) // b_g) * r_g
  ids = torch.from_numpy(host[f"{side}_tokens"][rows].astype(np.int64))
  mask = torch.from_numpy((host[f"{side}_segment_ids"][rows] > 0).astype(np.int64))
  return ids, mask


class TorchTrainStep:
  """The PyTorch equivalent of embed2's step: encoder + mean pool + Dense stack + InfoNCE + AdamW."""

  def __init__(self, st, *, temperature: float, lr: float, weight_decay: float, clip: float = 1.0):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.backbone = st[0].auto_model
    self.dense = [m.linear for m in st if hasattr(m, "linear")]
    params = list(self.backbone.parameters()) + [d.weight for d in self.dense]
    self.params = params
    self.temperature = temperature
    self.clip = clip
    self.opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.999), eps=1e-8)
    self.backbone.train()

  def __call__(self, q, p) -> tuple[float, float]:
    """One update on (ids, mask) pairs q and p; returns (loss, global grad norm before clipping)."""
    torch = self.torch
    self.opt.zero_grad(set_to_none=True)
    ids = torch.cat([q[0], p[0]])
    mask = torch.cat([q[1], p[1]])
    h = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(h.dtype)
    e = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
    for d in self.dense:
      e = d(e)
    e = torch.nn.functional.normalize(e, dim=-1)
    b = q[0].shape[0]
    logits = e[:b] @ e[b:].T / self.temperature
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(b))
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
    self.opt.step()
    return float(loss.detach()), float(norm)


def bench_train(args, st, embedder, vocab, rng) -> dict[str, Any]:
  """Checks the first step's loss and grad norm agree, then times both steps round-robin."""
  from embed2 import losses  # pylint: disable=g-import-not-at-top
  from embed2 import sharding  # pylint: disable=g-import-not-at-top
  from embed2.train import step as step_lib  # pylint: disable=g-import-not-at-top

  mesh = embedder.mesh
  num_groups = sharding.num_batch_shards(mesh)
  host = train_batch(args, vocab, rng, num_groups)
  cfg = embedder.config
  loss_cfg = losses.LossConfig(kind="softmax", temperature=args.temperature,
                               learnable_temperature=False, mrl_dims=(cfg.embed_dim,),
                               blockwise=True)
  # The Embedder's model is donated to the step from here on: inference must be done by now.
  trainee = step_lib.Trainee(embedder.model, {})
  graphdef, state, state_shardings = ts.make_state(trainee, mesh, learning_rate=args.lr)
  del trainee
  steps = step_lib.StepFunctions(graphdef, state_shardings, mesh, num_groups)
  batch = step_lib.device_batch(host, mesh)
  compiled = steps.get("vs_peers", loss_cfg, state, batch)
  torch_step = TorchTrainStep(st, temperature=args.temperature, lr=args.lr,
                              weight_decay=args.weight_decay)
  q, p = torch_inputs(host, "query", num_groups), torch_inputs(host, "positive", num_groups)

  state, metrics = compiled(state, batch)
  e2_loss, e2_norm = float(metrics["loss"]), float(metrics["grad_norm"])
  pt_loss, pt_norm = torch_step(q, p)
  out = {"batch": args.train_batch, "seq": args.train_seq, "tokens": int(host["num_tokens"]),
         "row_tokens": 2 * args.train_batch * args.train_seq,
         "first_step": {"embed2_loss": e2_loss, "torch_loss": pt_loss,
                        "loss_abs_diff": abs(e2_loss - pt_loss), "embed2_grad_norm": e2_norm,
                        "torch_grad_norm": pt_norm,
                        "grad_norm_rel_diff": abs(e2_norm - pt_norm) / max(pt_norm, 1e-30)},
         "optimizer": f"AdamW lr={args.lr} wd={args.weight_decay} (matrices) clip=1.0; "
                      "torch.optim.AdamW defaults otherwise (foreach/fused as torch picks)"}
  fs = out["first_step"]
  if not (fs["loss_abs_diff"] < args.tol and fs["grad_norm_rel_diff"] < 1e-3):
    out["refused"] = (f"first-step loss differs by {fs['loss_abs_diff']:.3g} (tol {args.tol}) or grad "
                      f"norm by {fs['grad_norm_rel_diff']:.3g} relative (tol 1e-3): no speed reported")
    return out
  thread = ts.StateThread(state)
  del state
  fns = {"embed2": thread.runner(compiled, batch)}
  fns.update(_torch_contenders(args, "torch", lambda: torch_step(q, p)))
  times = common.interleaved(fns, repeats=args.train_repeats, warmup=1)
  for name, t in times.items():
    s = common.summary(t)
    out[name] = {"step_s": s, "examples_per_s": args.train_batch / s["median_s"],
                 "tokens_per_s": out["tokens"] / s["median_s"]}
  out.update(_speedups(times, "embed2", "torch"))
  return out


# ------------------------------------------------------------------------------------------ run


def run(args: cli.Args) -> dict[str, Any]:
  """Builds both models from one random folder, compares inference and training; JSON-able results."""
  import sentence_transformers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  cfg = model_config(args)
  folder = tempfile.mkdtemp(prefix="embed2_vs_peers_")
  try:
    st, embedder, vocab = load_models(args, cfg, folder)
    rng = np.random.default_rng(args.seed)
    texts = make_texts(rng, args.texts, vocab_size=cfg.vocab_size, median_words=args.words,
                       max_words=args.max_len - 2)
    result: dict[str, Any] = {
        "benchmark": "vs_peers", "host": common.host_info(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "sentence_transformers": sentence_transformers.__version__},
        "threads": {"torch": torch.get_num_threads(), "jax": "XLA CPU default: all cores",
                    "cpus": os.cpu_count()},
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "model": cfg.to_dict(),
        "inference": bench_inference(args, st, embedder, texts),
    }
    if not args.no_train:
      result["train"] = bench_train(args, st, embedder, vocab, rng)
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  return result


def report(result: dict[str, Any]) -> str:
  inf = result["inference"]
  rows = []
  for name in [n for n in inf if n == "embed2" or n.startswith("sentence_transformers")]:
    if isinstance(inf[name], dict):
      rows.append({"part": "inference", "tool": name, "ms": 1e3 * inf[name]["time_s"]["median_s"],
                   "per_s": inf[name]["texts_per_s"], "tok_s": inf[name]["tokens_per_s"]})
  tr = result.get("train", {})
  for name in [n for n in tr if n == "embed2" or n.startswith("torch")]:
    if isinstance(tr[name], dict):
      rows.append({"part": "train step", "tool": name, "ms": 1e3 * tr[name]["step_s"]["median_s"],
                   "per_s": tr[name]["examples_per_s"], "tok_s": tr[name]["tokens_per_s"]})
  lines = [common.format_table(rows, (("part", "part"), ("tool", "tool"), ("ms", "median ms", ".1f"),
                                      ("per_s", "texts or ex/s", ".1f"),
                                      ("tok_s", "tokens/s", ".0f")))]
  lines.append(f"inference: max |embed2 - sentence-transformers| = {inf['max_abs_diff']:.2e}; " + (
      inf["refused"] if "refused" in inf else f"embed2 {inf['speedup']:.2f}x sentence-transformers at "
      f"equal threads, {inf['speedup_vs_fastest_torch']:.2f}x its fastest ({inf['fastest_torch']}); "
      "medians of paired rounds"))
  if tr:
    fs = tr["first_step"]
    lines.append(f"train step: first loss {fs['embed2_loss']:.6f} vs {fs['torch_loss']:.6f}, grad norm "
                 f"rel diff {fs['grad_norm_rel_diff']:.1e}; " + (
                     tr["refused"] if "refused" in tr else
                     f"embed2 {tr['speedup']:.2f}x PyTorch at equal threads, "
                     f"{tr['speedup_vs_fastest_torch']:.2f}x its fastest ({tr['fastest_torch']})"))
  th = result["threads"]
  lines.append(f"threads: torch {th['torch']}, jax {th['jax']} ({th['cpus']} CPUs); "
               f"{result['host']['device_kind']}, jax {result['host']['jax']}, torch "
               f"{result['versions']['torch']}")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> dict[str, Any]:
  """The command line after the program name -> the JSON document written to --out."""
  return common.run_and_write(_args(argv), run, report)


if __name__ == "__main__":
  cli.run(main, FLAGS)
