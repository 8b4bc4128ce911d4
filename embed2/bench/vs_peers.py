"""embed2 vs the tools users would pick instead, measured fairly: sentence-transformers inference (on
torch, and on ONNX Runtime) and a PyTorch train step, on the same EmbeddingGemma-shaped model (random
weights, one config) and the same inputs.

    python -m embed2.bench.vs_peers                              # 4 layers of the embeddinggemma-300m shape
    python -m embed2.bench.vs_peers --layers=24 --vocab=262144   # its full shape (slow on a CPU)
    python -m embed2.bench.vs_peers --segments=1 --no_train      # embed2 without packed inference
    python -m embed2.bench.vs_peers --toy --out=/tmp/vs_peers.json

The model. A transformers `Gemma3TextModel` with `use_bidirectional_attention=True` and random weights
(norm scales randomised too, so a mis-mapped norm shows), its config written by
`embed2.convert.hf_config_from_model_config` from the embed2 preset; a `SentenceTransformer` of it +
mean Pooling + Dense(768 -> 3072) + Dense(3072 -> 768) (bias-free, identity) + Normalize, saved to a
temporary folder with a tokenizer.json and loaded back offline, as a user loads EmbeddingGemma. embed2
reads the same folder through `embed2.convert.convert_hf` and `Embedder.from_checkpoint`. The
vocabulary is cut to --vocab (default 32768) so that a CPU train step is not mostly AdamW on the
262144 x 768 table; the blocks, heads and head stack are the preset's.

The tokenizer: the package's (`Tokenizer.default()`) written as a tokenizer.json
(`tokenizer.sentencepiece_to_hf`): sentence-transformers reads it with transformers' fast tokenizer,
embed2 with its `HFTokenizer`; the token ids of every input are checked equal first.

The inputs, three regimes of --texts inputs each (texts from `data_pipelines.stdlib_tasks`, the
offline corpus mined from the Python standard library):
  queries    docstring summaries of 8-32 tokens (bos / eos included): short search queries;
  documents  function sources and docstring bodies of 128-512 tokens (cut to --max_len);
  mix        the earlier random-word mix: log-normal word counts (median --words, at most 126),
             whole-word pieces of the vocabulary, Zipf-like.

The contenders, each in a process of its own whose thread pool is fixed when it starts (environment
and `torch.set_num_threads` / ONNX Runtime's `intra_op_num_threads` before any work), never changed
afterwards:
  embed2                 `Embedder.embed(texts)` (default packing: up to `segments` inputs per row),
                         XLA's CPU client with its default pool (all cores);
  embed2_unpacked        the same Embedder with segments=1 (one input per row): packing's own gain;
  embed2_1cpu            embed2 in a process pinned to one CPU (`os.sched_setaffinity` before jax
                         starts), so that embed2's fastest setting is compared as torch's is
                         (--noembed2_1cpu leaves it out). XLA's flags for one intra-op thread
                         (--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1) are
                         not honoured by its CPU runtime: a matmul loop under them used 1.7 CPU-s
                         per second on 2 cores;
  st_torch_{N}t          `SentenceTransformer.encode(texts, batch_size=--batch_size)` on torch with N
                         threads, for every N of --threads (default every count 1..cores, up to 4);
  st_onnx_{N}t           the same SentenceTransformer with its transformer module on ONNX Runtime
                         (`backend="onnx"`'s structure: the backbone exported to model.onnx, run by an
                         `onnxruntime.InferenceSession`, N intra-op threads); skipped, and said so in
                         the JSON, where onnxruntime / onnxscript are not installed (`pip install
                         -e ".[bench]"`). sentence-transformers' own backend="onnx" needs
                         optimum-onnx, whose only release (0.1.0) requires transformers < 4.58, so the
                         export is torch.onnx's (dynamo) exporter, loaded the way optimum loads it;
  train: embed2's compiled step vs the PyTorch step on torch with N threads (torch_{N}t).
Only one process works at a time: the others wait on their pipe.

Fairness. Outputs are compared before any timing: every contender's embeddings against
sentence-transformers on torch (max abs difference < --tol, float32), and the first train step's loss
and gradient norm; a contender that disagrees is refused (no speed). Every contender is warmed up
(one untimed call per regime, which also compiles embed2's shapes), then --repeats rounds in which
each contender runs once, in turn (round-robin), and the median over rounds of the paired ratio
t(theirs) / t(embed2). Each phase records what OTHER processes used of the machine meanwhile
(`CpuMeter`: busy CPU time from /proc/stat minus the benchmark's own processes'; the load average
counts the benchmark itself, ~2 on 2 cores) as `others_cpus`, with the load average (1 min) before
and after; a phase in which other work kept more than half the CPUs busy is flagged `busy` in the JSON
and the printed report.

Train step: embed2's compiled step (`StepFunctions`: blockwise NCE over in-batch negatives, fixed
temperature, AdamW with global-norm clipping and the non-finite guard) vs the PyTorch equivalent (the
same transformers model, mean pooling, the two Dense layers, L2 normalisation, cross-entropy over
q @ p^T / tau with the diagonal as positives, clip_grad_norm_, torch.optim.AdamW with the same
hyper-parameters and weight decay on matrices only), at the same B and L (one example per row, the
same token ids: stdlib code-search pairs cut to L). The first step's loss and gradient norm are
compared first (|loss diff| < --tol, relative grad-norm diff < 1e-3), then interleaved rounds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any, Sequence

import numpy as np
from absl import app, flags

from embed2 import cli
from embed2.bench import common
from embed2.bench import train_step as ts
from embed2.bench import xla_profile

REGIMES = ("queries", "documents", "mix")
# The embed2_1cpu contender's environment: the worker pins itself to one CPU before jax starts.
PIN_CPUS = "EMBED2_BENCH_CPUS"
ONE_CPU = {PIN_CPUS: "1", "OMP_NUM_THREADS": "1"}
QUERY_TOKENS = (8, 32)  # the queries regime: tokens per input, bos / eos included
DOCUMENT_TOKENS = (128, 512)  # the documents regime (cut to --max_len)
JAX_ENV = {"JAX_PLATFORMS": "cpu"}  # a CPU comparison, also on a machine with an accelerator
MATMUL_PROBE_N = 2048  # each library's f32 matmul FLOP/s is measured on (n, n) @ (n, n)
MIX_MAX_WORDS = 126  # the mix regime's longest text, as before (128 tokens with bos / eos)


FLAGS = common.program_flags("vs_peers")  # --out, --toy, and this program's own:
flags.DEFINE_integer("layers", 4, "blocks of the embeddinggemma-300m shape", flag_values=FLAGS)
flags.DEFINE_integer("vocab", 32768, "vocabulary size (preset: 262144)", flag_values=FLAGS)
flags.DEFINE_integer("texts", 128, "inputs per regime and inference round", flag_values=FLAGS)
flags.DEFINE_float("words", 40, "median words per text of the mix regime (log-normal)",
                   flag_values=FLAGS)
flags.DEFINE_integer("max_len", 512, "tokens per input at most (bos/eos incl.), both tools",
                     flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 32, "inference batch (embed2: rows per call), both tools",
                     flag_values=FLAGS)
flags.DEFINE_integer("bucket_step", 0,
                     "Embedder length buckets every this many tokens (0 = its default 32, 64, ...)",
                     flag_values=FLAGS)
flags.DEFINE_integer("segments", 0, "Embedder inputs per row at most (0 = its default)",
                     flag_values=FLAGS)
flags.DEFINE_integer("repeats", 5, "timed inference rounds per regime", flag_values=FLAGS)
flags.DEFINE_integer("train_batch", 8, "B of the train step", flag_values=FLAGS)
flags.DEFINE_integer("train_seq", 64, "L of the train step", flag_values=FLAGS)
flags.DEFINE_integer("train_repeats", 5, "timed train rounds", flag_values=FLAGS)
flags.DEFINE_bool("embed2_1cpu", True,
                  "also time embed2 pinned to one CPU (contender embed2_1cpu; off with --toy unless given)",
                  flag_values=FLAGS)
flags.DEFINE_bool("no_train", False, "skip the train-step comparison", flag_values=FLAGS)
flags.DEFINE_bool("profile", False,
                  "also say where embed2's time goes: a worker with XLA's HLO dumps per regime and for the "
                  "train step runs it under jax.profiler (`xla_profile.breakdown`), and each library's f32 "
                  "matmul FLOP/s is measured at its thread settings", flag_values=FLAGS)
flags.DEFINE_integer("profile_repeats", 3, "calls traced per profiled regime / step", flag_values=FLAGS)
flags.DEFINE_bool("onnx", True, "time sentence-transformers on ONNX Runtime (when installed)",
                  flag_values=FLAGS)
flags.DEFINE_float("temperature", 0.05, "loss temperature, both tools", flag_values=FLAGS)
flags.DEFINE_float("lr", 1e-4, "AdamW learning rate, both tools", flag_values=FLAGS)
flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay (matrices), both tools", flag_values=FLAGS)
flags.DEFINE_string("threads", "",
                    "comma-separated thread counts of the torch / ONNX Runtime contenders ('' = every "
                    "count from 1 to the cores, at most 4: 1,2 on 2 cores)", flag_values=FLAGS)
flags.DEFINE_float("tol", 1e-4, "max abs difference allowed (float32)", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the weights and texts", flag_values=FLAGS)


def _args(argv: Sequence[str]) -> cli.Args:
  args = cli.parse(FLAGS, argv)
  if args.toy:
    args.texts, args.words, args.max_len, args.batch_size, args.repeats = 6, 8, 64, 4, 1
    args.train_batch, args.train_seq, args.train_repeats = 8, 16, 1
    args.threads = args.threads or "1"
    if not FLAGS["embed2_1cpu"].present:  # off at toy size unless asked for
      args.embed2_1cpu = False
  cpus = os.cpu_count() or 1
  counts = [int(n) for n in args.threads.split(",") if n.strip()] or list(range(1, min(cpus, 4) + 1))
  if min(counts) < 1:
    raise app.UsageError(f"--threads={args.threads} must list counts >= 1")
  args.threads = sorted(set(counts))
  return args


def onnx_missing() -> str | None:
  """Why the ONNX Runtime contender cannot run here, or None when it can."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  missing = [m for m in ("onnxruntime", "onnx", "onnxscript") if importlib.util.find_spec(m) is None]
  return (f"{', '.join(missing)} not installed (pip install -e \".[bench]\")" if missing else None)


def model_config(args):
  """The embed2 ModelConfig both sides build: embeddinggemma-300m's shape (a toy shape with --toy)."""
  from embed2.model import ModelConfig  # pylint: disable=g-import-not-at-top
  if args.toy:
    return ModelConfig(name="toy", vocab_size=8192, model_dim=64, num_layers=2, num_heads=2,
                       num_kv_heads=1, head_dim=32, mlp_dim=128, sliding_window=9, global_every=2,
                       max_length=64, head_dims=(128, 64))
  return ModelConfig.from_name("embeddinggemma-300m", num_layers=args.layers, vocab_size=args.vocab,
                               max_length=max(args.max_len, args.train_seq, 512))


# ------------------------------------------------------------------------------------- inputs


def hf_tokenizer(tokenizer_json: str, max_len: int):
  """The tokenizer.json as a transformers fast tokenizer ([bos] ... [eos], padded on the right)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  return PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(tokenizer_json),
                                 bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                 unk_token="<unk>", model_max_length=max_len, padding_side="right",
                                 split_special_tokens=True)


def mix_texts(rng: np.random.Generator, n: int, vocab: dict[str, int], *, median_words: float,
              max_words: int) -> list[str]:
  """n texts of log-normal word counts; words Zipf-like over the vocabulary's whole-word pieces."""
  words = [p[1:] for p, _ in sorted(vocab.items(), key=lambda kv: kv[1])
           if p.startswith("\u2581") and p[1:].isalpha()]
  lengths = common.lognormal_lengths(rng, n, median_words, 0.6, max_words, min_len=1)
  return [" ".join(words[i] for i in np.minimum(rng.zipf(1.2, m) - 1, len(words) - 1))
          for m in lengths]


def make_inputs(args, tokenizer_json: str) -> dict[str, Any]:
  """{regime: texts} for the three regimes, and `train_pairs` (query, code) for the train step."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from data_pipelines import stdlib_tasks  # pylint: disable=g-import-not-at-top
  tk = tokenizers.Tokenizer.from_str(tokenizer_json)
  rng = np.random.default_rng(args.seed)
  code = stdlib_tasks.load_task("code_search", "train")
  docs = stdlib_tasks.load_task("doc_retrieval", "train")
  queries = sorted({e["query"] for e in code + docs})
  documents = sorted({e["positive"] for e in code + docs})

  def pick(texts, lo, hi):
    n_tok = [len(e.ids) for e in tk.encode_batch(texts)]
    ok = [t for t, m in zip(texts, n_tok) if lo <= m <= hi]
    if len(ok) < args.texts:
      raise ValueError(f"--texts={args.texts}: the corpus has only {len(ok)} texts of {lo}-{hi} tokens")
    return [ok[i] for i in rng.choice(len(ok), args.texts, replace=False)]

  out = {"queries": pick(queries, *QUERY_TOKENS), "documents": pick(documents, *DOCUMENT_TOKENS),
         "mix": mix_texts(rng, args.texts, tk.get_vocab(), median_words=args.words,
                          max_words=min(MIX_MAX_WORDS, args.max_len - 2))}
  pairs = [code[i] for i in rng.choice(len(code), args.train_batch, replace=False)]
  out["train_pairs"] = [(e["query"], e["positive"]) for e in pairs]
  return out


# -------------------------------------------------------------------------------------- models


def build_sentence_transformer(cfg, folder: str, *, max_len: int, tokenizer_json: str, seed: int
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
  hf_tokenizer(tokenizer_json, max_len).save_pretrained(hf_dir)
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


def export_onnx(st_dir: str) -> str:
  """The backbone of the sentence-transformers folder as ONNX (input_ids, attention_mask ->
  last_hidden_state; batch and length dynamic), where backend="onnx" keeps it: st_dir/onnx/model.onnx."""
  import torch  # pylint: disable=g-import-not-at-top
  from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top

  class Backbone(torch.nn.Module):

    def __init__(self, model):
      super().__init__()
      self.model = model

    def forward(self, input_ids, attention_mask):
      return self.model(input_ids=input_ids, attention_mask=attention_mask,
                        use_cache=False).last_hidden_state

  st = SentenceTransformer(st_dir, device="cpu", local_files_only=True)
  path = os.path.join(st_dir, "onnx", "model.onnx")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  ids = torch.tensor([[2, 5, 6, 7, 1, 0], [2, 8, 9, 10, 11, 1]])
  b, l = torch.export.Dim("batch"), torch.export.Dim("length")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.onnx.export(Backbone(st[0].auto_model).eval(), (ids, (ids > 0).long()), path, dynamo=True,
                      input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                      dynamic_shapes=({0: b, 1: l}, {0: b, 1: l}), verbose=False)
  return path


# ---------------------------------------------------------------------------------- train step


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


# ------------------------------------------------------------------------------ contender processes
# Each contender configuration runs in a process of its own (`worker_loop`), its threads fixed by its
# environment and settings before it does any work. The parent sends one JSON command per line on the
# worker's stdin and reads one JSON reply per line; the worker's own stdout goes to stderr.


class _Embed2Side:
  """embed2 in a worker: Embedders (packed, and unpacked) of the converted checkpoint; the train step."""

  def __init__(self, spec: dict[str, Any]):
    from embed2.inference import Embedder  # pylint: disable=g-import-not-at-top
    from embed2.model import ModelConfig  # pylint: disable=g-import-not-at-top
    self.spec = spec
    with open(spec["inputs"]) as f:
      self.inputs = json.load(f)
    a = spec["args"]
    kw = dict(max_length=a["max_len"], batch_size=a["batch_size"])
    if a["bucket_step"]:
      kw["buckets"] = tuple(range(a["bucket_step"], a["max_len"] + 1, a["bucket_step"]))
    if a["segments"]:
      kw["segments"] = a["segments"]
    self.embedder = Embedder.from_checkpoint(spec["ckpt"], **kw)
    cfg = ModelConfig.from_dict(spec["model"])
    got = self.embedder.config.replace(name=cfg.name, mrl_dims=cfg.mrl_dims)
    layers = range(cfg.num_layers)
    if [got.is_global_layer(i) for i in layers] == [cfg.is_global_layer(i) for i in layers]:
      got = got.replace(global_every=cfg.global_every)  # e.g. 4 layers, none global: any k > 4 says so
    if got != cfg.replace(max_length=got.max_length, max_segments=got.max_segments):
      raise AssertionError(f"the converted model's config differs from the one built:\n{got}\n{cfg}")
    e = self.embedder
    self.variants = {"embed2": e,
                     "embed2_unpacked": Embedder(e.model, e.tokenizer, max_length=e.max_length,
                                                 batch_size=e.batch_size, buckets=e.buckets,
                                                 mesh=e.mesh, segments=1)}
    self.info = {"segments": e.segments, "pack_length": e.pack_length, "buckets": list(e.buckets),
                 "batch_size": e.batch_size}

  def tokens(self, regime: str) -> dict[str, Any]:
    return {"ids": [t.tolist() for t in self.embedder.tokenize(self.inputs[regime])]}

  def embed(self, regime: str, out: str, variant: str = "embed2") -> dict[str, Any]:
    np.save(out, self.variants[variant].embed(self.inputs[regime]))
    return {}

  def time_embed(self, regime: str, variant: str = "embed2") -> dict[str, Any]:
    emb, texts = self.variants[variant], self.inputs[regime]
    t0 = time.perf_counter()
    emb.embed(texts)
    return {"s": time.perf_counter() - t0}

  def train_setup(self, out: str) -> dict[str, Any]:
    """Builds the train batch (written to `out` for the torch side), the state, and runs step 1."""
    from embed2 import losses  # pylint: disable=g-import-not-at-top
    from embed2 import sharding  # pylint: disable=g-import-not-at-top
    from embed2.data.packing import GroupShape, SideShape  # pylint: disable=g-import-not-at-top
    from embed2.train import step as step_lib  # pylint: disable=g-import-not-at-top
    a = self.spec["args"]
    b, l = a["train_batch"], a["train_seq"]
    mesh = self.embedder.mesh
    num_groups = sharding.num_batch_shards(mesh)
    if b % num_groups:
      raise ValueError(f"--train_batch={b} must be a multiple of the {num_groups} batch shards")

    def ids(text):  # the Embedder's token ids, cut to L (keeping eos)
      t = self.embedder.tokenize([text])[0]
      return t if len(t) <= l else np.concatenate([t[:l - 1], t[-1:]])

    pairs = self.inputs["train_pairs"]
    tuples = [{"query_tokens": ids(q), "positive_tokens": ids(p), "negative_tokens": [],
               "query_id": i, "positive_id": i} for i, (q, p) in enumerate(pairs)]
    g_rows = b // num_groups
    shape = GroupShape(examples=g_rows, segments=1, num_negatives=0,
                       query=SideShape(length=l, rows=g_rows), positive=SideShape(length=l, rows=g_rows))
    host = ts.pack_batch(shape, tuples, num_groups)
    if int(host["num_examples"]) != b:
      raise AssertionError(f"packed {int(host['num_examples'])} of {b} examples")
    np.savez(out, **{f"{side}_{k}": v for side in ("query", "positive")
                     for k, v in zip(("ids", "mask"), _rows_in_order(host, side, num_groups))})
    cfg = self.embedder.config
    loss_cfg = losses.LossConfig(kind="softmax", temperature=a["temperature"],
                                 learnable_temperature=False, mrl_dims=(cfg.embed_dim,),
                                 blockwise=True)
    # The model is donated to the step from here on: inference must be done by now.
    trainee = step_lib.Trainee(self.embedder.model, {})
    graphdef, state, state_shardings = ts.make_state(trainee, mesh, learning_rate=a["lr"])
    del trainee
    self.variants = {}
    steps = step_lib.StepFunctions(graphdef, state_shardings, mesh, num_groups)
    batch = step_lib.device_batch(host, mesh)
    compiled = steps.get("vs_peers", loss_cfg, state, batch)
    state, metrics = compiled(state, batch)
    thread = ts.StateThread(state)
    del state
    self.step = thread.runner(compiled, batch)
    return {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
            "tokens": int(host["num_tokens"]),
            "useful_flops": ts.batch_flops(cfg, host, ("query", "positive"))["useful"]}

  def time_train(self) -> dict[str, Any]:
    t0 = time.perf_counter()
    self.step()
    return {"s": time.perf_counter() - t0}

  def matmul_probe(self) -> dict[str, Any]:
    return {"flops": common.measured_matmul_flops("float32", n=MATMUL_PROBE_N, repeats=5)}

  def profile(self, what: str, trace_dir: str, dump_dir: str, repeats: int) -> dict[str, Any]:
    """Where the time of one call goes: `what` is a regime (`Embedder.embed` of its texts) or "train"
    (one step; after `train_setup`). Needs a worker started with `xla_profile.dump_env(dump_dir)`."""
    if what == "train":
      fn = self.step
    else:
      emb, texts = self.variants["embed2"], self.inputs[what]
      fn = lambda: emb.embed(texts)
    fn()  # compiles; warm
    wall = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn()
      wall.append(time.perf_counter() - t0)
    out = xla_profile.breakdown(xla_profile.trace_ops(fn, repeats, trace_dir),
                                xla_profile.read_hlo_dumps(dump_dir))
    out["wall_s"] = float(np.median(wall))
    return out


def _rows_in_order(host: dict[str, np.ndarray], side: str, num_groups: int):
  """(ids, mask) int64 (B, L) of one side of a packed host batch, rows in example order (S = 1)."""
  slot = host[f"{side}_slot"]
  b_g = slot.shape[0] // num_groups
  r_g = host[f"{side}_tokens"].shape[0] // num_groups
  rows = slot + (np.arange(slot.shape[0]) // b_g) * r_g
  return (host[f"{side}_tokens"][rows].astype(np.int64),
          (host[f"{side}_segment_ids"][rows] > 0).astype(np.int64))


class _TorchSide:
  """sentence-transformers (torch, or its transformer on ONNX Runtime) with N threads; the torch step."""

  def __init__(self, spec: dict[str, Any]):
    import torch  # pylint: disable=g-import-not-at-top
    from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.spec = spec
    torch.set_num_threads(spec["threads"])  # once, before any work; never changed afterwards
    with open(spec["inputs"]) as f:
      self.inputs = json.load(f)
    self.st = SentenceTransformer(spec["st_dir"], device="cpu", local_files_only=True)
    self.st.eval()
    if spec["kind"] == "onnx":
      module = self.st[0]
      module.model = ort_backbone(os.path.join(spec["st_dir"], "onnx", "model.onnx"), spec["threads"],
                                  module.model.config)
    self.info = {"torch_threads": torch.get_num_threads()}

  def tokens(self, regime: str) -> dict[str, Any]:
    return {"ids": self.st.tokenizer(self.inputs[regime], truncation=True)["input_ids"]}

  def _encode(self, regime):
    return self.st.encode(self.inputs[regime], batch_size=self.spec["args"]["batch_size"],
                          convert_to_numpy=True, show_progress_bar=False)

  def embed(self, regime: str, out: str, variant: str = "") -> dict[str, Any]:
    del variant
    np.save(out, self._encode(regime))
    return {}

  def time_embed(self, regime: str, variant: str = "") -> dict[str, Any]:
    del variant
    t0 = time.perf_counter()
    self._encode(regime)
    return {"s": time.perf_counter() - t0}

  def train_setup(self, batch: str) -> dict[str, Any]:
    torch = self.torch
    a = self.spec["args"]
    data = np.load(batch)
    self.q = (torch.from_numpy(data["query_ids"]), torch.from_numpy(data["query_mask"]))
    self.p = (torch.from_numpy(data["positive_ids"]), torch.from_numpy(data["positive_mask"]))
    self.step = TorchTrainStep(self.st, temperature=a["temperature"], lr=a["lr"],
                               weight_decay=a["weight_decay"])
    loss, norm = self.step(self.q, self.p)
    return {"loss": loss, "grad_norm": norm}

  def time_train(self) -> dict[str, Any]:
    t0 = time.perf_counter()
    self.step(self.q, self.p)
    return {"s": time.perf_counter() - t0}

  def matmul_probe(self) -> dict[str, Any]:
    """Best f32 (n, n) @ (n, n) FLOP/s of torch at this worker's threads, as `common.measured_matmul_flops`."""
    torch = self.torch
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(MATMUL_PROBE_N, MATMUL_PROBE_N, generator=g) for _ in range(2))
    times = common.interleaved({"matmul": lambda: torch.mm(a, b)}, repeats=5)["matmul"]
    return {"flops": 2.0 * MATMUL_PROBE_N ** 3 / min(times)}


def ort_backbone(path: str, threads: int, config):
  """An onnxruntime session (`threads` intra-op threads) as the torch Module that sentence-transformers'
  Transformer module calls, as optimum's ORTModelForFeatureExtraction is under backend="onnx"."""
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  opts = ort.SessionOptions()
  opts.intra_op_num_threads = threads
  opts.inter_op_num_threads = 1
  session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

  class OrtBackbone(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.config = config

    def forward(self, input_ids, attention_mask, **unused):
      h = session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
      return {"last_hidden_state": torch.from_numpy(h[0])}

  return OrtBackbone()


def pin_cpus() -> None:
  """Pins this process to the first N of the CPUs it may use, N = $EMBED2_BENCH_CPUS, if set: before jax
  or torch start their thread pools, so that every thread they start shares those CPUs. (The first of
  the allowed ones, not CPU 0: a container's cpuset need not hold CPU 0.)"""
  n = int(os.environ.get(PIN_CPUS) or 0)
  if n:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])


def worker_loop() -> None:
  """A contender process: JSON commands on stdin, one JSON reply each on the original stdout."""
  pin_cpus()
  replies = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)  # what libraries print goes to stderr, not into the replies
  warnings.filterwarnings("ignore", message=".*truncated")  # the documents regime cuts at --max_len
  side = None
  for line in sys.stdin:
    msg = json.loads(line)
    op = msg.pop("op")
    if op == "quit":
      break
    try:
      if op == "setup":
        side = (_Embed2Side if msg["kind"] == "embed2" else _TorchSide)(msg)
        reply = {"ok": True, **side.info, "cpus": len(os.sched_getaffinity(0))}
      else:
        reply = {"ok": True, **getattr(side, op)(**msg)}
    except Exception as e:  # pylint: disable=broad-except
      reply = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    replies.write(json.dumps(reply) + "\n")
    replies.flush()


class Worker:
  """The parent's handle on one contender process."""

  def __init__(self, name: str, env: dict[str, str], setup: dict[str, Any]):
    self.name = name
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, **env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    self.setup = setup
    self.proc = subprocess.Popen(
        [sys.executable, "-c", "from embed2.bench import vs_peers; vs_peers.worker_loop()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    self.send(op="setup", **setup)

  def send(self, **msg) -> None:
    self.proc.stdin.write(json.dumps(msg) + "\n")
    self.proc.stdin.flush()

  def recv(self) -> dict[str, Any]:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"contender process {self.name} ended (exit {self.proc.wait()}); its "
                         "stderr is above")
    reply = json.loads(line)
    if "error" in reply:
      raise RuntimeError(f"contender process {self.name}: {reply['error']}\n{reply['traceback']}")
    return reply

  def call(self, op: str, **kw) -> dict[str, Any]:
    self.send(op=op, **kw)
    return self.recv()

  def close(self) -> None:
    if self.proc.poll() is None:
      try:
        self.send(op="quit")
        self.proc.wait(timeout=30)
      except (OSError, subprocess.TimeoutExpired):
        self.proc.kill()
        self.proc.wait()


# ------------------------------------------------------------------------------------------ run


def _load() -> float:
  return os.getloadavg()[0]


def _busy_ticks() -> float | None:
  """Clock ticks all CPUs spent busy since boot (/proc/stat: user, nice, system, irq, softirq, steal),
  or None off Linux."""
  try:
    with open("/proc/stat") as f:
      fields = f.readline().split()
  except OSError:
    return None
  user, nice, system, _, _, irq, softirq, steal = (float(x) for x in fields[1:9])
  return user + nice + system + irq + softirq + steal


def _process_ticks(pids: Sequence[int]) -> float:
  """Clock ticks of CPU (user + system) the processes `pids` have used, those that still exist."""
  total = 0.0
  for pid in pids:
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    total += float(fields[11]) + float(fields[12])  # utime, stime (fields 14 and 15 of stat(5))
  return total


class CpuMeter:
  """How busy the machine was with OTHER work during a phase of this benchmark.

  The load average counts the benchmark itself (one contender computing on every core loads a 2-core
  machine by ~2), so it cannot tell an idle machine from a busy one. The meter takes the CPU time all
  CPUs spent busy (/proc/stat) minus the CPU time of the benchmark's own processes (/proc/PID/stat)
  over the phase: `others_cpus` is the average number of CPUs other processes kept busy, and the
  phase is flagged `busy` when that exceeds half the CPUs. The 1-minute load average before and after
  is kept beside it.
  """

  def __init__(self, pids: Sequence[int]):
    self.pids = [os.getpid(), *pids]
    self.t0 = time.perf_counter()
    self.load0 = _load()
    self.busy0 = _busy_ticks()
    self.ours0 = _process_ticks(self.pids)

  def stop(self) -> dict[str, Any]:
    wall = time.perf_counter() - self.t0
    cpus = os.cpu_count() or 1
    out: dict[str, Any] = {"load_before": self.load0, "load_after": _load(), "cpus": cpus}
    busy1 = _busy_ticks()
    if self.busy0 is None or busy1 is None:  # no /proc: the load average is all there is
      out.update(others_cpus=None, busy=self.load0 > cpus / 2)
      return out
    hz = os.sysconf("SC_CLK_TCK")
    others = (busy1 - self.busy0) - (_process_ticks(self.pids) - self.ours0)
    out["others_cpus"] = max(others, 0.0) / hz / max(wall, 1e-9)
    out["busy"] = out["others_cpus"] > cpus / 2
    return out


def _rounds(contenders: dict[str, tuple[Worker, dict[str, Any]]], op: str, repeats: int
            ) -> dict[str, list[float]]:
  """One untimed call each (warm-up), then `repeats` rounds of one call each, in turn: seconds."""
  for worker, kw in contenders.values():
    worker.call(op, **kw)
  out = {name: [] for name in contenders}
  for _ in range(repeats):
    for name, (worker, kw) in contenders.items():
      out[name].append(worker.call(op, **kw)["s"])
  return out


def _speedups(times: dict[str, list[float]], ours: Sequence[str], prefixes: Sequence[str],
              equal: str) -> dict[str, Any]:
  """Median paired ratios t(theirs) / t(ours), ours the fastest of the `ours` settings: vs the fastest
  contender of each prefix, and vs `equal` (the same thread count as XLA's default pool)."""
  ours = [n for n in ours if n in times]
  fastest = min(ours, key=lambda n: common.summary(times[n])["median_s"])
  out = {"fastest_embed2": fastest}
  ours = fastest
  for prefix in prefixes:
    names = [n for n in times if n.startswith(prefix)]
    if names:
      best = min(names, key=lambda n: common.summary(times[n])["median_s"])
      out[f"vs_fastest_{prefix.rstrip('_')}"] = common.median_ratio(times[best], times[ours])
      out[f"fastest_{prefix.rstrip('_')}"] = best
  if equal in times:
    out["vs_equal_threads"] = common.median_ratio(times[equal], times[ours])
    out["equal_threads"] = equal
  return out


def _ours(times: dict[str, Any]) -> list[str]:
  """embed2's settings (its default packing; the unpacked variant is packing's baseline, not one)."""
  return [n for n in times if n.startswith("embed2") and n != "embed2_unpacked"]


def bench_inference(args, workers: dict[str, Worker], texts: dict[str, list[str]], folder: str
                    ) -> dict[str, Any]:
  """Per regime: equal token ids, embeddings within --tol of sentence-transformers on torch, then
  interleaved rounds of every contender that agrees. `useful_gflop`: the analytic forward FLOPs of
  the texts' real tokens (each attending within itself), the same for every contender."""
  cfg = model_config(args)
  ref = next(n for n in workers if n.startswith("st_torch"))
  contenders = {"embed2": ("embed2", "embed2"), "embed2_unpacked": ("embed2", "embed2_unpacked")}
  contenders.update({n: (n, "embed2" if n.startswith("embed2") else "") for n in workers
                     if n != "embed2"})
  cpus = os.cpu_count() or 1
  out = {}
  for regime in REGIMES:
    ids_st = workers[ref].call("tokens", regime=regime)["ids"]
    ids_e2 = workers["embed2"].call("tokens", regime=regime)["ids"]
    if ids_st != ids_e2:
      bad = next(i for i, (a, b) in enumerate(zip(ids_st, ids_e2)) if a != b)
      raise AssertionError(f"{regime}: token ids differ at text {bad}: {ids_st[bad][:10]} vs "
                           f"{ids_e2[bad][:10]}")
    lengths = [len(t) for t in ids_e2]
    useful = ts.forward_flops(cfg, np.asarray(lengths), num_pooled=len(lengths))
    res: dict[str, Any] = {"texts": len(lengths), "tokens": sum(lengths), "useful_gflop": useful / 1e9,
                           "tokens_min_median_max": [min(lengths), int(np.median(lengths)),
                                                     max(lengths)],
                           "max_abs_diff": {}, "refused": {}}
    embs = {}
    for name, (w, variant) in contenders.items():
      path = os.path.join(folder, f"{regime}_{name}.npy")
      workers[w].call("embed", regime=regime, out=path, variant=variant)
      embs[name] = np.load(path)
    timed = {}
    for name, (w, variant) in contenders.items():
      diff = float(np.max(np.abs(embs[name] - embs[ref])))
      res["max_abs_diff"][name] = diff
      if diff < args.tol:
        timed[name] = (workers[w], {"regime": regime, "variant": variant})
      else:
        res["refused"][name] = (f"outputs differ from {ref} by {diff:.3g} >= tol {args.tol}: no speed "
                                "is reported until they agree")
    t0, meter = time.perf_counter(), CpuMeter([w.proc.pid for w in workers.values()])
    times = _rounds(timed, "time_embed", args.repeats) if "embed2" in timed else {}
    res["load"] = meter.stop()
    res["wall_s"] = time.perf_counter() - t0
    for name, t in times.items():
      s = common.summary(t)
      res[name] = {"time_s": s, "texts_per_s": len(lengths) / s["median_s"],
                   "tokens_per_s": res["tokens"] / s["median_s"],
                   "useful_gflop_per_s": useful / 1e9 / s["median_s"]}
    if times:
      res.update(_speedups(times, _ours(times), ("st_torch_", "st_onnx_"), f"st_torch_{cpus}t"))
      res["packing_gain"] = common.median_ratio(times["embed2_unpacked"], times["embed2"])
    out[regime] = res
  return out


def bench_train(args, workers: dict[str, Worker], folder: str) -> dict[str, Any]:
  """The first step's loss and grad norm agree, then interleaved rounds of the steps."""
  path = os.path.join(folder, "train_batch.npz")
  first = {"embed2": workers["embed2"].call("train_setup", out=path)}
  ours = {n: w for n, w in workers.items() if n.startswith("embed2_")}
  for name, w in ours.items():  # the same batch (the same inputs and tokenizer): the same step
    first[name] = w.call("train_setup", out=os.path.join(folder, f"train_batch_{name}.npz"))
  torch_workers = {n.replace("st_torch_", "torch_"): w for n, w in workers.items()
                   if n.startswith("st_torch_")}
  for name, w in torch_workers.items():
    first[name] = w.call("train_setup", batch=path)
  e2 = first["embed2"]
  out = {"batch": args.train_batch, "seq": args.train_seq, "tokens": e2["tokens"],
         "useful_gflop": e2["useful_flops"] / 1e9,
         "row_tokens": 2 * args.train_batch * args.train_seq,
         "first_step": {n: {"loss": f["loss"], "grad_norm": f["grad_norm"]} for n, f in first.items()},
         "optimizer": f"AdamW lr={args.lr} wd={args.weight_decay} (matrices) clip=1.0; "
                      "torch.optim.AdamW defaults otherwise (foreach/fused as torch picks)",
         "refused": {}}
  timed = {"embed2": (workers["embed2"], {})}
  for name, f in first.items():
    if name == "embed2":
      continue
    if name in ours:
      if abs(f["loss"] - e2["loss"]) < args.tol:
        timed[name] = (ours[name], {})
      continue
    loss_diff = abs(f["loss"] - e2["loss"])
    norm_diff = abs(f["grad_norm"] - e2["grad_norm"]) / max(f["grad_norm"], 1e-30)
    out["first_step"][name].update(loss_abs_diff=loss_diff, grad_norm_rel_diff=norm_diff)
    if loss_diff < args.tol and norm_diff < 1e-3:
      timed[name] = (torch_workers[name], {})
    else:
      out["refused"][name] = (f"first-step loss differs by {loss_diff:.3g} (tol {args.tol}) or grad "
                              f"norm by {norm_diff:.3g} relative (tol 1e-3): no speed reported")
  t0, meter = time.perf_counter(), CpuMeter([w.proc.pid for w in workers.values()])
  times = _rounds(timed, "time_train", args.train_repeats) if len(timed) > 1 else {}
  out["load"] = meter.stop()
  out["wall_s"] = time.perf_counter() - t0
  for name, t in times.items():
    s = common.summary(t)
    out[name] = {"step_s": s, "examples_per_s": args.train_batch / s["median_s"],
                 "tokens_per_s": out["tokens"] / s["median_s"],
                 "useful_gflop_per_s": out["useful_gflop"] / s["median_s"]}
  if times:
    out.update(_speedups(times, _ours(times), ("torch_",), f"torch_{os.cpu_count() or 1}t"))
  return out


def bench_profile(args, workers: dict[str, Worker], folder: str) -> dict[str, Any]:
  """Where embed2's time goes, and each library's f32 matmul FLOP/s at every thread setting: the
  ceiling both sides' matmuls run against. Each regime and the train step is profiled in an embed2
  worker of its own, compiling with XLA's HLO dumps on into a folder of its own: a trace names a
  program by its jitted function's name only, so the programs of one name that a dump folder holds
  must be those of the call traced."""
  out: dict[str, Any] = {"matmul_flops": {}, "matmul_n": MATMUL_PROBE_N}
  for name, w in workers.items():
    if name.startswith(("embed2", "st_torch_")):
      out["matmul_flops"][name] = w.call("matmul_probe")["flops"]
  spec = {**workers["embed2"].setup, "kind": "embed2"}
  for what in [*REGIMES] + ([] if args.no_train else ["train"]):
    dump = os.path.join(folder, f"hlo_{what}")
    worker = Worker(f"embed2_profile_{what}", {**JAX_ENV, **xla_profile.dump_env(dump)}, spec)
    try:
      worker.recv()
      if what == "train":
        worker.call("train_setup", out=os.path.join(folder, "train_batch_profile.npz"))
      out[what] = worker.call("profile", what=what, trace_dir=os.path.join(folder, f"trace_{what}"),
                              dump_dir=dump, repeats=args.profile_repeats)
    finally:
      worker.close()
  return out


def start_workers(args, cfg, st_dir: str, ckpt: str, inputs_path: str, onnx: bool
                  ) -> dict[str, Worker]:
  """The contender processes, started together (setup is not timed); their setup replies read."""
  common_spec = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "inputs": inputs_path,
                 "st_dir": st_dir}
  embed2_spec = {**common_spec, "kind": "embed2", "ckpt": ckpt, "model": cfg.to_dict()}
  workers = {"embed2": Worker("embed2", JAX_ENV, embed2_spec)}
  if args.embed2_1cpu:
    workers["embed2_1cpu"] = Worker("embed2_1cpu", {**JAX_ENV, **ONE_CPU}, embed2_spec)
  for n in args.threads:
    env = {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n), "RAYON_NUM_THREADS": str(n)}
    workers[f"st_torch_{n}t"] = Worker(f"st_torch_{n}t", env,
                                       {**common_spec, "kind": "torch", "threads": n})
    if onnx:
      workers[f"st_onnx_{n}t"] = Worker(f"st_onnx_{n}t", env,
                                        {**common_spec, "kind": "onnx", "threads": n})
  return workers


def run(args: cli.Args) -> dict[str, Any]:
  """Builds both models from one random folder, compares inference and training; JSON-able results."""
  import sentence_transformers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from embed2 import convert  # pylint: disable=g-import-not-at-top
  from embed2.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top

  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  cfg = model_config(args)
  folder = tempfile.mkdtemp(prefix="embed2_vs_peers_")
  workers: dict[str, Worker] = {}
  onnx_skip = None if args.onnx else "--noonnx"
  onnx_skip = onnx_skip or onnx_missing()
  try:
    tokenizer_json, _ = tok_lib.sentencepiece_to_hf(tok_lib.Tokenizer.default())
    st_dir = build_sentence_transformer(cfg, folder, max_len=args.max_len,
                                        tokenizer_json=tokenizer_json, seed=args.seed)
    ckpt = os.path.join(folder, "embed2")
    convert.convert_hf(st_dir, ckpt)
    if not onnx_skip:
      export_onnx(st_dir)
    inputs = make_inputs(args, tokenizer_json)
    inputs_path = os.path.join(folder, "inputs.json")
    with open(inputs_path, "w") as f:
      json.dump(inputs, f)
    workers = start_workers(args, cfg, st_dir, ckpt, inputs_path, not onnx_skip)
    setup = {name: w.recv() for name, w in workers.items()}
    result: dict[str, Any] = {
        "benchmark": "vs_peers", "host": common.host_info(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "sentence_transformers": sentence_transformers.__version__},
        "threads": {"torch_and_onnx": args.threads,
                    "jax": "XLA CPU default: all cores" + (
                        "; embed2_1cpu: pinned to one CPU (sched_setaffinity)" if args.embed2_1cpu
                        else ""),
                    "cpus": os.cpu_count(),
                    "affinity": {n: r["cpus"] for n, r in setup.items()}},
        "onnx": onnx_skip and f"skipped: {onnx_skip}" or (
            "sentence-transformers with its transformer module on an onnxruntime session of the "
            "torch.onnx (dynamo) export, intra_op_num_threads = N"),
        "embed2": {k: v for k, v in setup["embed2"].items() if k not in ("ok", "cpus")},
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "model": cfg.to_dict(),
        "inference": bench_inference(args, workers, inputs, folder),
    }
    if not args.no_train:
      result["train"] = bench_train(args, workers, folder)
    if args.profile:
      result["profile"] = bench_profile(args, workers, folder)
  finally:
    for w in workers.values():
      w.close()
    shutil.rmtree(folder, ignore_errors=True)
  return result


def _load_text(load: dict[str, Any]) -> str:
  others = load.get("others_cpus")
  return ((f"other processes kept {others:.2f} CPUs busy, " if others is not None else "")
          + f"load {load['load_before']:.1f} -> {load['load_after']:.1f}"
          + (" BUSY" if load["busy"] else ""))


def report(result: dict[str, Any]) -> str:
  rows, lines = [], []
  for regime, inf in result["inference"].items():
    for name in [n for n in inf if n.startswith(("embed2", "st_"))]:
      if isinstance(inf[name], dict) and "time_s" in inf[name]:
        rows.append({"part": regime, "tool": name, "ms": 1e3 * inf[name]["time_s"]["median_s"],
                     "per_s": inf[name]["texts_per_s"], "tok_s": inf[name]["tokens_per_s"]})
    diff = max(inf["max_abs_diff"].values())
    lines.append(
        f"{regime}: max |diff| vs sentence-transformers {diff:.1e}; {inf.get('fastest_embed2')} "
        f"{inf.get('vs_fastest_st_torch', float('nan')):.2f}x its fastest torch "
        f"({inf.get('fastest_st_torch')}), "
        + (f"{inf['vs_fastest_st_onnx']:.2f}x its fastest ONNX Runtime ({inf['fastest_st_onnx']}), "
           if "vs_fastest_st_onnx" in inf else "")
        + f"packing {inf.get('packing_gain', float('nan')):.2f}x; {_load_text(inf['load'])}"
        + (f"; refused: {inf['refused']}" if inf["refused"] else ""))
  tr = result.get("train", {})
  for name in [n for n in tr if n.startswith(("embed2", "torch_"))]:
    if isinstance(tr[name], dict) and "step_s" in tr[name]:
      rows.append({"part": "train step", "tool": name, "ms": 1e3 * tr[name]["step_s"]["median_s"],
                   "per_s": tr[name]["examples_per_s"], "tok_s": tr[name]["tokens_per_s"]})
  table = common.format_table(rows, (("part", "part"), ("tool", "tool"), ("ms", "median ms", ".1f"),
                                     ("per_s", "texts or ex/s", ".1f"), ("tok_s", "tokens/s", ".0f")))
  if tr:
    lines.append(f"train step: first losses {({n: round(f['loss'], 6) for n, f in tr['first_step'].items()})}; "
                 f"{tr.get('fastest_embed2')} {tr.get('vs_fastest_torch', float('nan')):.2f}x PyTorch's fastest "
                 f"({tr.get('fastest_torch')}); {_load_text(tr['load'])}"
                 + (f"; refused: {tr['refused']}" if tr["refused"] else ""))
  prof = result.get("profile")
  if prof:
    lines.append(f"f32 matmul GFLOP/s ({prof['matmul_n']}^3): " + ", ".join(
        f"{n} {v / 1e9:.0f}" for n, v in prof["matmul_flops"].items()))
    for what in [w for w in (*REGIMES, "train") if w in prof]:
      p = prof[what]
      cells = ", ".join(f"{k} {1e3 * v:.0f}" for k, v in p.items()
                        if k.endswith(("_matmul", "_other")))
      lines.append(f"where embed2's time goes, {what}: wall {1e3 * p['wall_s']:.0f} ms; in XLA ops "
                   f"{1e3 * p['op_seconds']:.0f} CPU-ms ({cells}), matmuls {p['matmul_share']:.0%}")
  th = result["threads"]
  lines.append(f"threads: torch / ONNX Runtime {th['torch_and_onnx']}, jax {th['jax']} ({th['cpus']} "
               f"CPUs); embed2 segments={result['embed2']['segments']}; onnx: {result['onnx']}; "
               f"{result['host']['device_kind']}, jax {result['host']['jax']}, torch "
               f"{result['versions']['torch']}")
  return "\n".join([table] + lines)


def main(argv: Sequence[str]) -> dict[str, Any]:
  """The command line after the program name -> the JSON document written to --out."""
  return common.run_and_write(_args(argv), run, report)


if __name__ == "__main__":
  cli.run(main, FLAGS)
