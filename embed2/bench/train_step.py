"""Train-step throughput, MFU, the loss's share of the step, and packed vs padded through the model.

    python -m embed2.bench.train_step                          # small preset (the demo's), B=32, L=128
    python -m embed2.bench.train_step --preset=embeddinggemma-300m --layers=4 --vocab=32768 \
        --batch=16 --seq=128 --lengths=full --no_loss_share      # CPU MFU of the EmbeddingGemma shape
    python -m embed2.bench.train_step --preset=gemma3-1b --batch=32 --seq=512 --dtype=bfloat16 \
        --lengths=full --no_padded                             # GPU MFU (one H100 / H200)
    python -m embed2.bench.train_step --toy --out=/tmp/train_step.json

The step timed is the trainer's own: `embed2.train.step.StepFunctions` compiles
`train_step(trainee, optimizer, batch)` (embed the sides, sharded blockwise NCE loss, AdamW with
clipping, the non-finite guard), state donated, on a batch built by the real packer
(`embed2.data.packing.pack_group`, rows suggested as the pipeline suggests them) and put on the
mesh by `step.device_batch`. One training state is threaded through every variant's compiled step,
round-robin, and each variant's time is the median over rounds.

Variants (table rows):
  packed        examples of the length mix, up to S per row.
  padded        the same examples one per row (S = 1, R = B): the cost without packing.
  full          (--lengths=full) every sequence exactly L tokens, one per row: no padding (MFU runs).
  trivial_loss  the first variant's batch with the contrastive loss replaced by a trivial loss of the
                same embeddings (-mean <q, p>): the encoder's forward and backward are unchanged.

Length mixes (--lengths): `mix` log-normal queries (median 0.14 L) and passages (median 0.27 L), the
packing bench's mix scaled to one L; `demo` the demo's code-search task (stdlib docstrings -> code)
through the package tokenizer; `full` every sequence L tokens.

FLOPs. Analytic FLOPs count real (non-pad) tokens only: per token 2 x the matmul parameters of every
block (q, k, v, o, gate, up, down), per sequence of n tokens and layer 4 * H * hd * pairs(n) for
QK^T and PV with pairs(n) = n^2 (bidirectional: the full n x n, not halved as causal counts are;
on sliding-window layers only the pairs |i - j| < window), and 2 x the head's matmul parameters per
pooled example. Embedding lookups, norms, softmax and the loss are not counted. A train step is
3 x forward (backward = 2 x forward). MFU = analytic train FLOPs / step time / (peak x devices).
XLA's count (`compiled.cost_analysis()["flops"]`) covers what the program really computes: every
row token, the full L x L attention of each row, remat's recomputation, the optimizer; so
xla_over_analytic = that / the analytic count, and xla_over_rows = that / the analytic count over
all row tokens with L x L attention per row (close to 1 without remat, ~4/3 with full remat).

Loss share: 1 - t(trivial_loss) / t(packed), the median over paired rounds; and the loss alone
(value and gradient of the same loss on (B, d) embeddings of the step's batch) over the step time.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import numpy as np
from absl import flags

from embed2 import cli
from embed2.bench import common
from embed2.model import presets

LENGTH_MIXES = ("mix", "demo", "full")
_SAMPLE = 1024  # tuples the packed rows are suggested from (pipeline.ROWS_SAMPLE_SIZE)


FLAGS = common.program_flags("train_step")  # --out, --toy, and this program's own:
flags.DEFINE_enum("preset", "small", sorted(presets.PRESETS), "model preset", flag_values=FLAGS)
flags.DEFINE_integer("layers", 0, "num_layers override (0 = the preset's)", flag_values=FLAGS)
flags.DEFINE_integer("vocab", 0, "vocab_size override (0 = the preset's)", flag_values=FLAGS)
flags.DEFINE_integer("batch", 32, "B: examples per step (global)", flag_values=FLAGS)
flags.DEFINE_integer("seq", 128, "L: tokens per row, every side", flag_values=FLAGS)
flags.DEFINE_integer("segments", 8, "S: examples per packed row at most", flag_values=FLAGS)
flags.DEFINE_integer("num_negatives", 0, "K: hard negatives per example", flag_values=FLAGS)
flags.DEFINE_enum("lengths", "mix", LENGTH_MIXES, "length mix (module docstring)", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ("float32", "bfloat16"), "compute dtype", flag_values=FLAGS)
flags.DEFINE_enum("remat", "none", ("none", "full", "dots"), "rematerialisation policy",
                  flag_values=FLAGS)
flags.DEFINE_enum("attention_impl", "xla", presets.ATTENTION_IMPLS,
                  "attention implementation", flag_values=FLAGS)
flags.DEFINE_integer("block_size", 1024, "blockwise loss block size", flag_values=FLAGS)
flags.DEFINE_integer("steps", 5, "timed rounds (every variant once a round)", flag_values=FLAGS)
flags.DEFINE_integer("warmup", 1, "untimed rounds first", flag_values=FLAGS)
flags.DEFINE_bool("no_padded", False, "skip the padded baseline", flag_values=FLAGS)
flags.DEFINE_bool("no_loss_share", False, "skip the trivial-loss variant", flag_values=FLAGS)
flags.DEFINE_float("peak_flops", 0.0,
                   "peak FLOP/s per device (default: datasheet table / measured on CPU)",
                   flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the generated batches", flag_values=FLAGS)


def _args(argv: Sequence[str]) -> cli.Args:
  args = cli.parse(FLAGS, argv)
  if args.toy:
    args.preset, args.layers, args.batch, args.seq, args.segments = "tiny", 1, 16, 32, 4
    args.steps, args.warmup = 2, 1
  if args.lengths == "full":
    args.segments = 1
  return args


# --------------------------------------------------------------------------------------- FLOPs


def _pairs(n: np.ndarray, window: int | None) -> np.ndarray:
  """Query-key pairs of a bidirectional sequence of n tokens: n^2, or |i - j| < window only."""
  n = np.asarray(n, np.float64)
  if window is None:
    return n * n
  far = np.maximum(n - window, 0)  # pairs with |i - j| >= window: (n - w)(n - w + 1)
  return n * n - far * (far + 1)


def forward_flops(cfg, lengths: np.ndarray, *, num_pooled: int) -> float:
  """Analytic forward FLOPs of the embedding model over sequences of `lengths` tokens.

  Args:
    cfg: the ModelConfig.
    lengths: int (N,) tokens of each sequence (each attends within itself).
    num_pooled: vectors that go through the dense head.

  Returns:
    FLOPs (multiply-add = 2): block matmuls per token, bidirectional attention per sequence (sliding
    layers: pairs within the window), head matmuls per pooled vector.
  """
  d, h, k, hd, f = (cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
                    cfg.mlp_dim)
  per_token = 2.0 * cfg.num_layers * (d * h * hd + 2 * d * k * hd + h * hd * d + 3 * d * f)
  lengths = np.asarray(lengths)
  total = per_token * float(lengths.sum())
  for i in range(cfg.num_layers):
    window = None if cfg.is_global_layer(i) else cfg.sliding_window
    total += 4.0 * h * hd * float(_pairs(lengths, window).sum())
  dims = (cfg.model_dim,) + tuple(cfg.head_dims)
  total += 2.0 * num_pooled * sum(a * b for a, b in zip(dims[:-1], dims[1:]))
  return total


def batch_flops(cfg, host: dict[str, np.ndarray], sides: Sequence[str]) -> dict[str, float]:
  """Analytic train-step FLOPs (3 x forward) of a packed host batch.

  Returns:
    {"useful": over real tokens, each example attending within itself; "rows": over every row token
    with L x L attention per row and the head on all R x S slots (what the xla kernel computes)}.
  """
  useful = rows = 0.0
  s = cfg.max_segments
  for side in sides:
    seg = host[f"{side}_segment_ids"]
    r, l = seg.shape
    counts = np.bincount((np.arange(r)[:, None] * (s + 1) + seg).ravel(), minlength=r * (s + 1))
    counts = counts.reshape(r, s + 1)[:, 1:]
    lengths = counts[counts > 0]
    useful += forward_flops(cfg, lengths, num_pooled=lengths.size)
    full_cfg = dataclasses.replace(cfg, sliding_window=max(cfg.sliding_window, l))
    rows += forward_flops(full_cfg, np.full(r, l), num_pooled=r * s)
  return {"useful": 3.0 * useful, "rows": 3.0 * rows}


def xla_flops(compiled) -> float | None:
  """FLOPs of a compiled executable by XLA's cost analysis (None where the backend gives none)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


# --------------------------------------------------------------------------------------- batches


def length_tuples(args, rng: np.random.Generator, n: int, vocab_size: int) -> list[dict[str, Any]]:
  """n tokenized tuples of the chosen length mix (see the module docstring)."""
  l, k = args.seq, args.num_negatives
  if args.lengths == "full":
    return common.token_tuples(rng, n, query_len=l, positive_len=l, negative_len=l, num_negatives=k,
                               query_median=l, passage_median=l, query_sigma=0.0,
                               passage_sigma=0.0, vocab_size=vocab_size)
  if args.lengths == "mix":
    return common.token_tuples(rng, n, query_len=l, positive_len=l, negative_len=l, num_negatives=k,
                               query_median=max(3.0, 0.14 * l), passage_median=max(3.0, 0.27 * l),
                               vocab_size=vocab_size)
  from data_pipelines import tasks  # pylint: disable=g-import-not-at-top
  from embed2.data import transforms  # pylint: disable=g-import-not-at-top
  from embed2.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  examples = tasks.build_task("stdlib_code_search", "train")
  tok = Tokenizer.default()
  if tok.vocab_size > vocab_size:
    raise ValueError(f"--lengths=demo uses the package tokenizer ({tok.vocab_size} ids) but the model "
                     f"has vocab_size={vocab_size}; pick a preset with a larger vocabulary")
  maps = [transforms.Tokenize(tokenizer=tok, in_key="query", out_key="query_tokens",
                            truncated_key="query_truncated", max_length=l),
          transforms.Tokenize(tokenizer=tok, in_key="positive", out_key="positive_tokens",
                            truncated_key="positive_truncated", max_length=l)]
  if k:
    maps.append(transforms.Tokenize(tokenizer=tok, in_key="negatives", out_key="negative_tokens",
                                  truncated_key="negative_truncated", max_length=l, max_items=k))
  out = []
  for i in rng.permutation(len(examples))[:n]:
    ex = dict(examples[int(i)])
    for m in maps:
      ex = m.map(ex)
    ex.setdefault("negative_tokens", [])
    out.append(ex)
  return out


def pack_batch(shape, tuples: Sequence[dict[str, Any]], num_groups: int) -> dict[str, np.ndarray]:
  """One global host batch: G groups packed one after another from `tuples` (consumed in order)."""
  from embed2.data import packing  # pylint: disable=g-import-not-at-top
  stream = iter(enumerate(tuples))
  groups = []
  for _ in range(num_groups):
    gb, _ = packing.pack_group(shape, [], lambda: next(stream))
    groups.append(gb)
  return packing.concat_groups(shape, groups)


def variant_shapes(args, tuples, num_groups: int) -> dict[str, Any]:
  """Group shapes of the variants: packed (rows suggested from the tuples) and/or padded / full."""
  from embed2.data import pipeline  # pylint: disable=g-import-not-at-top
  k, l = args.num_negatives, args.seq
  base = dict(batch_size=args.batch, query_len=l, positive_len=l, negative_len=l if k else 0,
              num_negatives=k)
  one_per_row = dict(segments=1, query_rows=args.batch, positive_rows=args.batch,
                     negative_rows=args.batch * k if k else None)
  if args.lengths == "full":
    return {"full": pipeline.group_shape(pipeline.BatchSpec(**base, **one_per_row), num_groups)}
  shapes = {"packed": pipeline.group_shape(pipeline.BatchSpec(**base, segments=args.segments),
                                           num_groups, tuples[:_SAMPLE], where="packed")}
  if not args.no_padded:
    shapes["padded"] = pipeline.group_shape(pipeline.BatchSpec(**base, **one_per_row), num_groups)
  return shapes


# -------------------------------------------------------------------------------- state and steps


def make_state(trainee, mesh, *, learning_rate: float = 1e-4, total_steps: int = 1000):
  """(graphdef, state, state_shardings) of (trainee, AdamW optimizer), as the trainer builds them."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from embed2.train import optim  # pylint: disable=g-import-not-at-top
  ocfg = optim.OptimConfig(learning_rate=learning_rate, weight_decay=0.01)
  tx = optim.make_optimizer(ocfg, total_steps, nnx.state(trainee, nnx.Param))
  with jax.set_mesh(mesh):
    optimizer = nnx.Optimizer(trainee, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((trainee, optimizer))
  return graphdef, state, jax.tree.map(lambda x: x.sharding, state)


def trivial_loss(q_bd, p_bd, *, neg_bkd=None, neg_valid_bk=None, q_ids_b=None, p_ids_b=None,
                 valid_b=None, log_scale=None, bias=None, temperature: float = 0.05):
  """-mean <q, p> (+ mean <q, n>): touches every embedding, costs nothing next to the encoder.

  The same contract as `losses.sharded_contrastive_loss(...)`'s function, so `train_step` takes it.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  del neg_valid_bk, q_ids_b, p_ids_b, bias
  w = jnp.ones(q_bd.shape[0], jnp.float32) if valid_b is None else valid_b.astype(jnp.float32)
  loss = -jnp.sum(w * jnp.sum(q_bd * p_bd, -1)) / jnp.maximum(jnp.sum(w), 1.0)
  if neg_bkd is not None:
    loss = loss + jnp.mean(jnp.einsum("bd,bkd->bk", q_bd, neg_bkd))
  scale = jnp.exp(log_scale) if log_scale is not None else jnp.asarray(1.0 / temperature)
  return loss, {"loss": loss, "scale": scale}


def compile_step(graphdef, state_shardings, mesh, num_groups: int, loss_fn: Callable, state, batch):
  """`train_step` with `loss_fn`, jitted exactly as `StepFunctions.get` does (for the trivial loss)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from embed2.train import step as step_lib  # pylint: disable=g-import-not-at-top

  def step(state, batch):
    trainee, optimizer = nnx.merge(graphdef, state)
    metrics = step_lib.train_step(trainee, optimizer, batch, loss_fn=loss_fn, num_groups=num_groups)
    return nnx.state((trainee, optimizer)), metrics

  with jax.set_mesh(mesh):
    return jax.jit(step, donate_argnums=0, out_shardings=(state_shardings, None)).lower(
        state, batch).compile()


class StateThread:
  """Holds the one training state that every compiled step consumes (donates) and returns."""

  def __init__(self, state):
    self.state = state

  def runner(self, compiled, batch) -> Callable[[], None]:
    """A blocking callable: one step of `compiled` on `batch`."""
    def call():
      self.state, metrics = compiled(self.state, batch)
      metrics["loss"].block_until_ready()  # one executable: its outputs are ready together
    return call


def time_loss_alone(loss_fn, batch, mesh, embed_dim: int, loss_params: dict, repeats: int
                    ) -> list[float]:
  """Seconds of value_and_grad of `loss_fn` on random unit (B, d) embeddings of `batch`'s examples."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from embed2 import sharding  # pylint: disable=g-import-not-at-top
  b = batch["example_valid"].shape[0]
  keys = jax.random.split(jax.random.key(1), 3)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q = jax.device_put(unit(jax.random.normal(keys[0], (b, embed_dim))), sharding.batch_sharding(mesh, 2))
  p = jax.device_put(unit(jax.random.normal(keys[1], (b, embed_dim))), sharding.batch_sharding(mesh, 2))
  neg = None
  if "negative_slot" in batch:
    k = batch["negative_slot"].shape[1]
    neg = jax.device_put(unit(jax.random.normal(keys[2], (b, k, embed_dim))),
                         sharding.batch_sharding(mesh, 3))
  side = {"neg_valid_bk": batch.get("negative_valid") if neg is not None else None,
          "q_ids_b": batch.get("query_ids"), "p_ids_b": batch.get("positive_ids"),
          "valid_b": batch.get("example_valid")}

  def loss(q, p, n, lp):
    return loss_fn(q, p, neg_bkd=n, **side, **lp)[0]

  with jax.set_mesh(mesh):
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    call = lambda: jax.block_until_ready(f(q, p, neg, loss_params))
    return common.interleaved({"loss": call}, repeats=repeats)["loss"]


# ------------------------------------------------------------------------------------------- run


def build(args):
  """Model config, loss config, mesh and the sharded trainee: the pieces `run` times."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from embed2 import losses  # pylint: disable=g-import-not-at-top
  from embed2 import sharding  # pylint: disable=g-import-not-at-top
  from embed2.model import EmbeddingModel, ModelConfig  # pylint: disable=g-import-not-at-top
  from embed2.train import step as step_lib  # pylint: disable=g-import-not-at-top

  overrides = dict(dtype=args.dtype, remat=args.remat, attention_impl=args.attention_impl,
                   max_segments=args.segments)
  if args.layers:
    overrides["num_layers"] = args.layers
  if args.vocab:
    overrides["vocab_size"] = args.vocab
  cfg = ModelConfig.from_name(args.preset, **overrides)
  if cfg.max_length < args.seq:
    cfg = cfg.replace(max_length=args.seq)
  loss_cfg = losses.LossConfig(kind="softmax", temperature=0.05, learnable_temperature=True,
                               mrl_dims=cfg.resolved_mrl_dims, blockwise=True,
                               block_size=args.block_size)
  mesh = sharding.make_mesh({"data": -1})
  rules = sharding.DEFAULT_RULES
  loss_params = losses.init_loss_params(loss_cfg)

  def factory():
    return step_lib.Trainee(EmbeddingModel(cfg, rules=rules, rngs=nnx.Rngs(args.seed)), loss_params)

  trainee = sharding.create_sharded(factory, mesh, rules)
  return cfg, loss_cfg, mesh, trainee


def run(args: cli.Args) -> dict[str, Any]:
  """Builds the variants, times them round-robin; returns the JSON-able results."""
  import jax  # pylint: disable=g-import-not-at-top
  from embed2 import losses  # pylint: disable=g-import-not-at-top
  from embed2 import sharding  # pylint: disable=g-import-not-at-top
  from embed2.data import packing  # pylint: disable=g-import-not-at-top
  from embed2.train import step as step_lib  # pylint: disable=g-import-not-at-top

  cfg, loss_cfg, mesh, trainee = build(args)
  num_groups = sharding.num_batch_shards(mesh)
  if args.batch % num_groups:
    raise ValueError(f"--batch={args.batch} must be a multiple of the {num_groups} batch shards")
  rng = np.random.default_rng(args.seed)
  tuples = length_tuples(args, rng, max(_SAMPLE, 4 * args.batch), cfg.vocab_size)
  shapes = variant_shapes(args, tuples, num_groups)
  sides = packing.SIDES if args.num_negatives else packing.SIDES[:2]

  graphdef, state, state_shardings = make_state(trainee, mesh)
  del trainee
  steps = step_lib.StepFunctions(graphdef, state_shardings, mesh, num_groups)
  compiled, batches, hosts, results = {}, {}, {}, {}
  for name, shape in shapes.items():
    hosts[name] = pack_batch(shape, tuples, num_groups)
    batches[name] = step_lib.device_batch(hosts[name], mesh)
    t0 = time.perf_counter()
    compiled[name] = steps.get(name, loss_cfg, state, batches[name])
    results[name] = {"compile_s": round(time.perf_counter() - t0, 2)}
  first = next(iter(shapes))
  if not args.no_loss_share:
    name = "trivial_loss"
    loss_fn = lambda q, p, **kw: trivial_loss(q, p, **kw, temperature=loss_cfg.temperature)
    t0 = time.perf_counter()
    compiled[name] = compile_step(graphdef, state_shardings, mesh, num_groups, loss_fn, state,
                                  batches[first])
    batches[name], hosts[name] = batches[first], hosts[first]
    results[name] = {"compile_s": round(time.perf_counter() - t0, 2)}

  thread = StateThread(state)
  del state
  times = common.interleaved({n: thread.runner(compiled[n], batches[n]) for n in compiled},
                             repeats=args.steps, warmup=args.warmup)
  peak, peak_source = common.device_peak_flops(args.dtype, override=args.peak_flops)
  n_dev = jax.device_count()
  for name in compiled:
    host = hosts[name]
    stats = packing.batch_stats(host)
    row_tokens = sum(host[f"{s}_tokens"].size for s in sides)
    flops = batch_flops(cfg, host, sides)
    xla = xla_flops(compiled[name])
    t = common.summary(times[name])
    med = t["median_s"]
    results[name].update({
        "step_s": t, "step_ms": round(1e3 * med, 2),
        "examples": int(stats["num_examples"]), "useful_tokens": int(stats["num_tokens"]),
        "row_tokens": int(row_tokens),
        "nonpad_fraction": round(stats["num_tokens"] / row_tokens, 4),
        "rows": {s: int(host[f"{s}_tokens"].shape[0]) for s in sides},
        "examples_per_s": stats["num_examples"] / med,
        "useful_tokens_per_s": stats["num_tokens"] / med,
        "row_tokens_per_s": row_tokens / med,
        "analytic_flops": flops["useful"], "analytic_row_flops": flops["rows"],
        "xla_flops": xla,
        "xla_over_analytic": xla / flops["useful"] if xla else None,
        "xla_over_rows": xla / flops["rows"] if xla else None,
        "mfu": flops["useful"] / med / (peak * n_dev),
    })
  out: dict[str, Any] = {
      "benchmark": "train_step", "host": common.host_info(),
      "config": {k: v for k, v in vars(args).items() if k != "out"},
      "model": cfg.to_dict(), "loss": dataclasses.asdict(loss_cfg),
      "num_groups": num_groups, "peak_flops_per_device": peak, "peak_flops_source": peak_source,
      "timing": "median over rounds; every variant once per round (round-robin), one state threaded",
      "variants": results,
  }
  if not args.no_loss_share:
    share = 1.0 - common.median_ratio(times["trivial_loss"], times[first])
    loss_fn = losses.sharded_contrastive_loss(mesh, cfg=loss_cfg)
    alone = time_loss_alone(loss_fn, batches[first], mesh, cfg.embed_dim,
                            losses.init_loss_params(loss_cfg), max(args.steps, 3))
    out["loss_share"] = {
        "variant": first,
        "share_of_step": share,
        "loss_alone_ms": 1e3 * common.summary(alone)["median_s"],
        "loss_alone_share": common.summary(alone)["median_s"] / results[first]["step_s"]["median_s"],
        "how": "share_of_step = 1 - t(step, trivial loss) / t(step, blockwise NCE), median of paired "
               "rounds; loss_alone = value_and_grad of the loss on (B, d) embeddings / step time",
    }
  if "packed" in results and "padded" in results:
    useful = results["packed"]["useful_tokens"] / results["padded"]["useful_tokens"]
    out["packed_over_padded"] = {
        "useful_tokens_per_s": useful * common.median_ratio(times["padded"], times["packed"]),
        "padded_padding_fraction": 1.0 - results["padded"]["nonpad_fraction"],
        "packed_nonpad_fraction": results["packed"]["nonpad_fraction"],
    }
  return out


COLUMNS = (("name", "variant"), ("step_ms", "step ms", ".1f"), ("examples_per_s", "ex/s", ".1f"),
           ("useful_tokens_per_s", "useful tok/s", ".0f"), ("row_tokens_per_s", "row tok/s", ".0f"),
           ("nonpad_fraction", "nonpad", ".3f"), ("tflop", "TFLOP/step", ".4f"),
           ("mfu", "MFU", ".2%"), ("xla_over_analytic", "XLA/analytic", ".2f"),
           ("xla_over_rows", "XLA/rows", ".2f"), ("compile_s", "compile s", ".1f"))


def report(result: dict[str, Any]) -> str:
  rows = [dict(v, name=k, tflop=v.get("analytic_flops", 0) / 1e12)
          for k, v in result["variants"].items()]
  lines = [common.format_table(rows, COLUMNS),
           f"peak {result['peak_flops_per_device']:.3g} FLOP/s per device "
           f"({result['peak_flops_source']}); {result['host']['num_devices']} device(s) "
           f"{result['host']['device_kind']}, jax {result['host']['jax']}"]
  if "loss_share" in result:
    ls = result["loss_share"]
    lines.append(f"loss share of the step: {ls['share_of_step']:.1%} (trivial-loss comparison); "
                 f"loss alone {ls['loss_alone_ms']:.2f} ms = {ls['loss_alone_share']:.1%} of the step")
  if "packed_over_padded" in result:
    pp = result["packed_over_padded"]
    lines.append(f"packed / padded useful tokens/s: {pp['useful_tokens_per_s']:.2f}x (padded batch "
                 f"is {pp['padded_padding_fraction']:.0%} padding, packed {pp['packed_nonpad_fraction']:.0%}"
                 " non-pad)")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> dict[str, Any]:
  """The command line after the program name -> the JSON document written to --out."""
  return common.run_and_write(_args(argv), run, report)


if __name__ == "__main__":
  cli.run(main, FLAGS)
