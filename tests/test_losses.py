"""Tests for embed2.losses: a float64 numpy reference written from the formula, gradients by
float64 finite differences of that reference, sharded == single device, blockwise == dense, memory
from the compiled program, bad inputs."""

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from embed2 import losses

AUTO = jax.sharding.AxisType.Auto
# The correctness tests compile many small programs and compiling dominates their run time; LLVM
# optimisation level 0 compiles ~1/3 faster and changes no float semantics (no fast-math).
FAST_COMPILE = {"xla_backend_optimization_level": 0}

# ------------------------------------------------------------------------------------------------
# The reference: loops over the formula in float64, independent of the implementation.
# ------------------------------------------------------------------------------------------------


def _norm(x):
  n = np.linalg.norm(x)
  return x / max(n, 1e-12)


def _lse(xs):
  xs = np.asarray(xs, np.float64)
  m = xs.max()
  return m + math.log(np.exp(xs - m).sum())


def _logsig(x):
  return -np.logaddexp(0.0, -x)


def ref_loss(q, p, neg=None, neg_valid=None, qid=None, pid=None, valid=None, log_scale=None,
             bias=None, kind="softmax", temperature=0.05, symmetric=False, dims=(), weights=None,
             in_batch=True, use_ids=True):
  """Returns (total loss, {dim: loss}, {dim: accuracy}) in float64."""
  q, p = np.asarray(q, np.float64), np.asarray(p, np.float64)
  b, d = q.shape
  dims = tuple(dims) or (d,)
  weights = weights or (1.0,) * len(dims)
  valid = np.ones(b, bool) if valid is None else np.asarray(valid)
  qid = np.arange(b) if (qid is None or not use_ids) else np.asarray(qid)
  pid = np.arange(b) if (pid is None or not use_ids) else np.asarray(pid)
  scale = 1.0 / temperature if log_scale is None else math.exp(log_scale)
  bias = (-10.0 if bias is None else bias) if kind == "sigmoid" else 0.0
  k = 0 if neg is None else neg.shape[1]

  def negatives_of(i):  # examples j whose target is a negative for query i (and vice versa)
    if not in_batch:
      return []
    return [j for j in range(b)
            if j != i and valid[j] and qid[i] != qid[j] and pid[i] != pid[j]]

  total, per_dim, acc = 0.0, {}, {}
  for m, w in zip(dims, weights):
    z = lambda x, y: scale * float(_norm(x[:m]) @ _norm(y[:m])) + bias
    losses_i, correct = [], []
    for i in range(b):
      if not valid[i]:
        continue
      pos = z(q[i], p[i])
      inb = [z(q[i], p[j]) for j in negatives_of(i)]
      hard = [z(q[i], neg[i, kk]) for kk in range(k) if neg_valid is None or neg_valid[i, kk]]
      if kind == "softmax":
        li = -pos + _lse([pos] + inb + hard)
        if symmetric:
          rev = [z(p[i], q[j]) for j in negatives_of(i)]
          li = 0.5 * (li + (-pos + _lse([pos] + rev)))
      else:
        li = -_logsig(pos) - sum(_logsig(-x) for x in inb + hard)
      losses_i.append(li)
      correct.append(pos > max(inb + hard, default=-np.inf))
    per_dim[m] = float(np.mean(losses_i)) if losses_i else 0.0
    acc[m] = float(np.mean(correct)) if correct else 0.0
    total += w * per_dim[m]
  return total, per_dim, acc


def fd_grad(f, x, h=1e-6):
  """Central finite differences of a float64 scalar function of an array (or float)."""
  x = np.array(x, np.float64)
  g = np.zeros_like(x)
  flat, gflat = x.reshape(-1), g.reshape(-1)
  for idx in range(flat.size):
    old = flat[idx]
    flat[idx] = old + h
    fp = f(x.reshape(np.shape(x)))
    flat[idx] = old - h
    fm = f(x.reshape(np.shape(x)))
    flat[idx] = old
    gflat[idx] = (fp - fm) / (2 * h)
  return g


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# ------------------------------------------------------------------------------------------------
# Cases.
# ------------------------------------------------------------------------------------------------


def _case(name, seed=0):
  """(inputs dict for the loss, config kwargs) for a named scenario; B=6, d=6."""
  rng = np.random.default_rng(seed)
  b, d = 6, 6
  x = {"q": rng.normal(size=(b, d)), "p": rng.normal(size=(b, d))}
  cfg = {"learnable_temperature": True}
  x["log_scale"] = 1.3  # scale ~3.7 keeps the float32-vs-float64 comparison well conditioned
  if name == "plain":
    pass
  elif name == "hard_negatives_duplicates":
    x["neg"] = rng.normal(size=(b, 3, d))
    x["neg_valid"] = np.array([[1, 1, 1], [1, 0, 1], [0, 0, 0], [1, 1, 0], [1, 1, 1], [0, 1, 1]],
                              bool)
    x["qid"] = np.array([0, 1, 0, 2, 3, 4])  # queries 0 and 2 share content
    x["pid"] = np.array([5, 6, 7, 6, 8, 9])  # examples 1 and 3 share a target
    x["q"][2] = x["q"][0]
    x["p"][3] = x["p"][1]
  elif name == "classification":  # 6 queries, 3 labels: same-label targets are identical
    labels = np.array([0, 1, 0, 2, 1, 0])
    table = rng.normal(size=(3, d))
    x["p"] = table[labels]
    x["pid"] = labels
    x["qid"] = np.arange(b) + 100
    # The other labels as hard negatives (same shapes and config as the case above).
    x["neg"] = np.stack([table[(labels + 1) % 3], table[(labels + 2) % 3], table[labels]], 1)
    x["neg_valid"] = np.array([[1, 1, 0]] * b, bool)
  elif name == "symmetric_validity":
    cfg["symmetric"] = True
    x["qid"] = np.array([0, 1, 2, 1, 3, 4])
    x["valid"] = np.array([1, 0, 1, 1, 0, 1], bool)
    x["neg"] = rng.normal(size=(b, 2, d))
    x["q"][1] = np.nan  # padded slots may hold garbage
    x["neg"][4] = np.inf
  elif name == "mrl":
    cfg["mrl_dims"] = (2, 4, 5)
    cfg["mrl_weights"] = (1.0, 0.5, 0.25)
    cfg["symmetric"] = True
    x["neg"] = rng.normal(size=(b, 2, d))
  elif name == "sigmoid":
    cfg.update(kind="sigmoid", mrl_dims=(3, 6))
    x["bias"] = -1.5
    x["neg"] = rng.normal(size=(b, 2, d))
    x["pid"] = np.array([0, 1, 2, 0, 3, 4])
    x["valid"] = np.array([1, 1, 0, 1, 1, 1], bool)
  elif name == "no_in_batch":
    cfg["in_batch_negatives"] = False
    x["neg"] = rng.normal(size=(b, 2, d))
  else:
    raise ValueError(name)
  return x, cfg


CASES = ["plain", "hard_negatives_duplicates", "classification", "symmetric_validity", "mrl",
         "sigmoid", "no_in_batch"]
DIFF_KEYS = ("q", "p", "neg", "log_scale", "bias")


def _ref_from(x, cfg):
  kw = dict(neg=x.get("neg"), neg_valid=x.get("neg_valid"), qid=x.get("qid"), pid=x.get("pid"),
            valid=x.get("valid"), log_scale=x.get("log_scale"), bias=x.get("bias"),
            kind=cfg.get("kind", "softmax"), symmetric=cfg.get("symmetric", False),
            dims=cfg.get("mrl_dims", ()), weights=cfg.get("mrl_weights"),
            in_batch=cfg.get("in_batch_negatives", True))
  return ref_loss(x["q"], x["p"], **kw)


def _int_args(x):
  """The non-differentiable inputs of a case, as loss kwargs."""
  names = {"qid": "q_ids_b", "pid": "p_ids_b", "valid": "valid_b", "neg_valid": "neg_valid_bk"}
  return {names[k]: jnp.asarray(v) for k, v in x.items() if k in names}


def _jax_args(x, dtype=jnp.float32):
  neg = None if "neg" not in x else jnp.asarray(x["neg"], dtype)
  bias = None if "bias" not in x else jnp.float32(x["bias"])
  return (jnp.asarray(x["q"], dtype), jnp.asarray(x["p"], dtype), neg, jnp.float32(x["log_scale"]),
          bias)


# ------------------------------------------------------------------------------------------------
# Against the float64 reference: loss, accuracy and gradients.
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _both_implementations(cfg_items, argnums):
  """A jitted fn(diff_args, int_args) -> [value_and_grad of blockwise, of dense]: one compiled
  program per loss configuration, shared by the cases and tests that use it (compiles dominate
  this file's run time)."""
  impls = [losses.LossConfig(**dict(cfg_items), blockwise=blockwise, block_size=4)
           for blockwise in (True, False)]  # 6 targets = a block of 4 + a padded block

  def run(diff, ints):
    out = []
    for cfg in impls:
      def f(q, p, neg, log_scale, bias, cfg=cfg):
        return losses.contrastive_loss(q, p, neg_bkd=neg, log_scale=log_scale, bias=bias, **ints,
                                       cfg=cfg)
      out.append(jax.value_and_grad(f, argnums=argnums, has_aux=True)(*diff))
    return out

  return jax.jit(run, compiler_options=FAST_COMPILE)


def _run_both(x, cfg_kw):
  argnums = tuple(i for i, k in enumerate(DIFF_KEYS) if k in x)
  program = _both_implementations(tuple(sorted(cfg_kw.items())), argnums)
  return program(_jax_args(x), _int_args(x))


@pytest.mark.parametrize("name", CASES)
def test_matches_float64_reference(name):
  x, cfg_kw = _case(name)
  want, want_dim, want_acc = _ref_from(x, cfg_kw)
  assert np.isfinite(want)

  # Reference gradients: finite differences of the float64 reference (not of the implementation).
  def ref_of(key):
    def f(v):
      y = dict(x)
      y[key] = v
      return _ref_from(y, cfg_kw)[0]
    return f

  keys = [k for k in DIFF_KEYS if k in x]
  want_grads = {k: fd_grad(ref_of(k), x[k]) for k in keys}
  if "valid" in x:  # the garbage in padded slots has zero gradient
    inv = ~x["valid"]
    for k in ("q", "p"):
      want_grads[k][inv] = 0.0
    if "neg" in x:
      want_grads["neg"][inv] = 0.0

  for blockwise, ((loss, aux), grads) in zip((True, False), _run_both(x, cfg_kw)):
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, want, rtol=2e-6, err_msg=f"{name} blockwise={blockwise}")
    for m, v in want_dim.items():
      np.testing.assert_allclose(aux[f"loss/dim_{m}"], v, rtol=2e-6)
      np.testing.assert_allclose(aux[f"accuracy/dim_{m}"], want_acc[m], atol=1e-7)
    for k, g in zip(keys, grads):
      assert np.all(np.isfinite(g)), (name, k)
      np.testing.assert_allclose(g, want_grads[k], rtol=1e-4, atol=1e-5 * np.abs(want_grads[k]).max(),
                                 err_msg=f"grad {k} {name} blockwise={blockwise}")


def test_fixed_temperature_and_clamped_scale():
  x, _ = _case("classification", seed=3)
  args = _jax_args(x)
  fixed = losses.LossConfig(temperature=0.05)
  clamped = losses.LossConfig(learnable_temperature=True, max_scale=10.0)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def f(q, p, n, s):
    fixed_loss, aux = losses.contrastive_loss(q, p, neg_bkd=n, cfg=fixed)
    clamped_loss, g = jax.value_and_grad(
        lambda s: losses.contrastive_loss(q, p, log_scale=s, cfg=clamped)[0])(s)
    return fixed_loss, aux["scale"], clamped_loss, g

  loss, scale, clamped_loss, g = f(*args[:3], jnp.float32(math.log(50.0)))
  want = ref_loss(x["q"], x["p"], x["neg"], temperature=0.05)[0]
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(scale, 20.0, rtol=1e-6)
  # A learnable scale above max_scale is clamped (and gets no gradient there).
  loss = clamped_loss
  np.testing.assert_allclose(loss, ref_loss(x["q"], x["p"], log_scale=math.log(10.0))[0], rtol=1e-5)
  assert g == 0.0


def test_init_loss_params():
  assert losses.init_loss_params(losses.LossConfig()) == {}
  params = losses.init_loss_params(losses.LossConfig(learnable_temperature=True, temperature=0.1))
  np.testing.assert_allclose(params["log_scale"], math.log(10.0), rtol=1e-6)
  params = losses.init_loss_params(
      losses.LossConfig(kind="sigmoid", learnable_temperature=True, sigmoid_bias=-7.0))
  assert set(params) == {"log_scale", "bias"} and float(params["bias"]) == -7.0


def test_bf16_embeddings_give_f32_logits():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(40, 24)), jnp.bfloat16)
  p = jnp.asarray(rng.normal(size=(40, 24)), jnp.bfloat16)
  cfg = losses.LossConfig(block_size=16, mrl_dims=(8, 24))
  (loss, _), (gq, gp) = jax.jit(jax.value_and_grad(
      lambda q, p: losses.contrastive_loss(q, p, cfg=cfg), argnums=(0, 1), has_aux=True),
                                compiler_options=FAST_COMPILE)(q, p)
  assert loss.dtype == jnp.float32 and gq.dtype == jnp.bfloat16 and gp.dtype == jnp.bfloat16
  # Same as float32 (and float64) arithmetic on the bf16-rounded inputs: nothing ran in bf16.
  want = ref_loss(np.asarray(q, np.float64), np.asarray(p, np.float64), dims=(8, 24))[0]
  np.testing.assert_allclose(loss, want, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# NaN and bad inputs.
# ------------------------------------------------------------------------------------------------


def test_nan_in_valid_example_gives_nan_loss():
  x, cfg_kw = _case("symmetric_validity", seed=2)
  losses_of = lambda x: [loss for (loss, _), _ in _run_both(x, cfg_kw)]  # blockwise, dense
  assert np.all(np.isfinite(losses_of(x)))  # garbage in padded slots is not a NaN
  for where in ("q", "p", "neg"):
    y = {k: np.array(v) for k, v in x.items()}
    y[where][3] = np.nan  # example 3 is valid
    assert np.all(np.isnan(losses_of(y))), where


def test_nan_in_valid_example_gives_nan_loss_sharded():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AUTO,))
  rng = np.random.default_rng(0)
  q = rng.normal(size=(16, 8)).astype(np.float32)
  q[13] = np.nan
  fn = losses.sharded_contrastive_loss(mesh, cfg=losses.LossConfig(block_size=4))
  p = rng.normal(size=(16, 8))
  loss, _ = jax.jit(fn, compiler_options=FAST_COMPILE)(jnp.asarray(q), jnp.asarray(p, jnp.float32))
  assert np.isnan(loss)


def test_bad_inputs_name_the_argument():
  cfg = losses.LossConfig()
  q = jnp.ones((4, 8))
  bad = [
      (dict(q_bd=jnp.ones((4, 8, 1)), p_bd=q), "q_bd"),
      (dict(q_bd=q, p_bd=jnp.ones((4, 7))), "p_bd"),
      (dict(q_bd=q, p_bd=jnp.ones((5, 8))), "p_bd"),
      (dict(q_bd=q, p_bd=q, neg_bkd=jnp.ones((4, 2, 7))), "neg_bkd"),
      (dict(q_bd=q, p_bd=q, neg_bkd=jnp.ones((3, 2, 8))), "neg_bkd"),
      (dict(q_bd=q, p_bd=q, neg_bkd=jnp.ones((4, 2, 8)), neg_valid_bk=jnp.ones((4, 3), bool)),
       "neg_valid_bk"),
      (dict(q_bd=q, p_bd=q, q_ids_b=jnp.arange(5)), "q_ids_b"),
      (dict(q_bd=q, p_bd=q, p_ids_b=jnp.ones(4)), "p_ids_b"),
      (dict(q_bd=q, p_bd=q, valid_b=jnp.ones(4, jnp.int32)), "valid_b"),
      (dict(q_bd=q, p_bd=q, valid_b=jnp.ones(3, bool)), "valid_b"),
      (dict(q_bd=q, p_bd=q, log_scale=jnp.ones(2)), "log_scale"),
      (dict(q_bd=q, p_bd=q, bias=jnp.float32(1)), "bias"),
      (dict(q_bd=jnp.ones((4, 8), jnp.int32), p_bd=q), "q_bd"),
  ]
  for kw, name in bad:
    for fn in (losses.contrastive_loss, losses.dense_contrastive_loss):
      with pytest.raises(ValueError, match=name):
        fn(**kw, cfg=cfg)
  with pytest.raises(ValueError, match="mrl_dims"):
    losses.contrastive_loss(q, q, cfg=losses.LossConfig(mrl_dims=(4, 16)))
  with pytest.raises(ValueError, match="log_scale"):
    losses.contrastive_loss(q, q, cfg=losses.LossConfig(learnable_temperature=True))
  for kw, field in [(dict(temperature=0.0), "temperature"), (dict(kind="nce"), "kind"),
                    (dict(mrl_dims=(8, 4)), "mrl_dims"), (dict(block_size=0), "block_size"),
                    (dict(mrl_dims=(4, 8), mrl_weights=(1.0,)), "mrl_weights"),
                    (dict(kind="sigmoid", symmetric=True), "symmetric"),
                    (dict(symmetric=True, in_batch_negatives=False), "symmetric")]:
    with pytest.raises(ValueError, match=field):
      losses.LossConfig(**kw)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AUTO,))
  with pytest.raises(ValueError, match="q_bd has global batch 12"):
    losses.sharded_contrastive_loss(mesh, cfg=cfg)(jnp.ones((12, 8)), jnp.ones((12, 8)))


# ------------------------------------------------------------------------------------------------
# Blockwise == dense at larger sizes; sharded == single device on 8 simulated devices.
# ------------------------------------------------------------------------------------------------


def _big_inputs(b=32, d=16, k=2, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "q": rng.normal(size=(b, d)), "p": rng.normal(size=(b, d)), "neg": rng.normal(size=(b, k, d)),
      "neg_valid": rng.random((b, k)) > 0.25, "qid": rng.integers(0, b // 2, b),
      "pid": rng.integers(0, b, b), "valid": rng.random(b) > 0.15, "log_scale": 2.5, "bias": -3.0,
  }


def _value_and_grads(x, kind, fns):
  """[((loss, aux), grads) of fn for fn in fns], all in ONE compiled program (compiles dominate
  this file's run time). Each fn(q, p, *, neg_bkd, log_scale, bias, ...ids) -> (loss, aux)."""
  args = list(_jax_args(x))
  if kind != "sigmoid":
    args[4] = None
  argnums = (0, 1, 2, 3) + ((4,) if kind == "sigmoid" else ())

  def run(diff, ints):
    out = []
    for fn in fns:
      def f(q, p, neg, log_scale, bias, fn=fn):
        return fn(q, p, neg_bkd=neg, log_scale=log_scale, bias=bias, **ints)
      out.append(jax.value_and_grad(f, argnums=argnums, has_aux=True)(*diff))
    return out

  return jax.jit(run, compiler_options=FAST_COMPILE)(tuple(args), _int_args(x))


SOFTMAX = dict(kind="softmax", symmetric=True, mrl_dims=(8, 16), mrl_weights=(1.0, 0.3),
               learnable_temperature=True)
SIGMOID = dict(kind="sigmoid", mrl_dims=(8, 16), learnable_temperature=True)


def _dense(kw):
  return lambda *a, **k: losses.dense_contrastive_loss(*a, **k, cfg=losses.LossConfig(**kw))


def test_blockwise_equals_dense():
  kw, blocks = SOFTMAX, (1, 7)
  x = _big_inputs(b=40, seed=5)
  # One target per block; blocks not dividing 40 (one block >= B: test_fixed_temperature...).
  impls = [lambda *a, cfg=losses.LossConfig(**kw, block_size=n), **k:
           losses.contrastive_loss(*a, **k, cfg=cfg) for n in blocks]
  results = _value_and_grads(x, kw["kind"], [_dense(kw)] + impls)
  (want, _), want_g = results[0]
  for block, ((got, _), got_g) in zip(blocks, results[1:]):
    assert _rel_err(got, want) < 1e-6, block
    for a, b in zip(got_g, want_g):
      assert _rel_err(a, b) < 1e-5, block


# (mesh shape, axis names, configs, whether to check the sharded dense variant too)
SHARDED_CASES = [
    ((2, 4), ("data", "fsdp"), (SOFTMAX, SIGMOID), True),
    ((8,), ("data",), (SOFTMAX,), False),
    ((4, 2), ("data", "tensor"), (SOFTMAX,), False),
]


def _sharded_inputs():
  x = _big_inputs(b=32, seed=7)
  # Without target ids an example's global position is its id: this pins each device's offset.
  del x["pid"]
  return x


@functools.lru_cache(maxsize=None)
def _single_device_reference(kind):
  kw = SOFTMAX if kind == "softmax" else SIGMOID
  return _value_and_grads(_sharded_inputs(), kind, [_dense(kw)])[0]


@pytest.mark.parametrize("shape,names,configs,with_dense", SHARDED_CASES)
def test_sharded_equals_single_device(shape, names, configs, with_dense):
  x = _sharded_inputs()
  mesh = jax.make_mesh(shape, names, axis_types=(AUTO,) * len(names))
  batch = NamedSharding(mesh, P(tuple(n for n in names if n != "tensor")))

  def on_mesh(fn):
    def sharded_fn(q, p, neg_bkd, **k):  # the batch placed on the mesh, as in the train step
      put = lambda a: None if a is None else jax.device_put(a, batch)
      k = {n: (put(v) if n.endswith(("_b", "_bk")) else v) for n, v in k.items()}
      return fn(put(q), put(p), neg_bkd=put(neg_bkd), **k)
    return sharded_fn

  for kw in configs:
    (want, want_aux), want_g = _single_device_reference(kw["kind"])
    variants = (True, False) if with_dense else (True,)
    fns = [on_mesh(losses.sharded_contrastive_loss(  # 32 targets = 10 blocks of 3 + a padded one
        mesh, cfg=losses.LossConfig(**kw, blockwise=blockwise, block_size=3)))
           for blockwise in variants]
    results = _value_and_grads(x, kw["kind"], fns)
    for blockwise, ((got, aux), got_g) in zip(variants, results):
      assert _rel_err(got, want) < 1e-5, (kw["kind"], blockwise)
      for key in want_aux:
        assert _rel_err(aux[key], want_aux[key]) < 1e-5, (kw["kind"], key)
      for a, b in zip(got_g, want_g):
        assert _rel_err(a, b) < 1e-5, (kw["kind"], blockwise)


# ------------------------------------------------------------------------------------------------
# Memory, read from the compiled program (value_and_grad of the loss).
# ------------------------------------------------------------------------------------------------


def _compiled(fn, b, d, mesh=None):
  sharding = None if mesh is None else NamedSharding(mesh, P("data"))
  sds = jax.ShapeDtypeStruct((b, d), jnp.float32, sharding=sharding)
  vg = jax.value_and_grad(lambda q, p: fn(q, p)[0], argnums=(0, 1))
  return jax.jit(vg).lower(sds, sds).compile()


def _largest_f32_buffer(hlo_text):
  sizes = [math.prod(int(s) for s in dims.split(",") if s) for dims in
           re.findall(r"f32\[([\d,]*)\]", hlo_text)]
  return max(sizes)


def test_memory_linear_in_global_batch():
  d, b_local, block = 64, 256, 256
  cfg = losses.LossConfig(block_size=block, mrl_dims=(32, 64))
  temps = {}
  for n_dev in (4, 8):  # fixed per-device batch; global batch 1024 -> 2048
    mesh = jax.make_mesh((n_dev,), ("data",), axis_types=(AUTO,), devices=jax.devices()[:n_dev])
    bg = b_local * n_dev
    compiled = _compiled(losses.sharded_contrastive_loss(mesh, cfg=cfg), bg, d, mesh)
    temps[n_dev] = compiled.memory_analysis().temp_size_in_bytes
    text = compiled.as_text()
    assert f"f32[{bg},{bg}]" not in text
    assert f"f32[{b_local},{bg}]" not in text
    # No f32 buffer as large as a (B_local, B_global) similarity block, in any layout.
    assert _largest_f32_buffer(text) < b_local * bg
  assert temps[8] <= 2.2 * temps[4], temps
  # The check above can fail: the sharded dense loss does hold (B_local, M, B_global) blocks.
  dense = dataclasses.replace(cfg, blockwise=False)
  text = _compiled(losses.sharded_contrastive_loss(mesh, cfg=dense), bg, d, mesh).as_text()
  assert _largest_f32_buffer(text) >= b_local * bg

  # One device holding the whole global batch: blockwise ~2x, dense ~4x per doubling.
  single = {}
  for blockwise in (True, False):
    cfg = losses.LossConfig(blockwise=blockwise, block_size=block)
    for bg in (1024, 2048):
      compiled = _compiled(lambda q, p, cfg=cfg: losses.contrastive_loss(q, p, cfg=cfg), bg, d)
      single[blockwise, bg] = compiled.memory_analysis().temp_size_in_bytes
      assert (f"f32[{bg},{bg}]" in compiled.as_text()) == (not blockwise)
  assert single[True, 2048] <= 2.2 * single[True, 1024], single
  assert single[False, 2048] >= 3.5 * single[False, 1024], single
