"""Model soups: averages against float64 numpy, greedy selection, refusals, sharded == one device."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app
from flax import nnx

from embed2 import sharding, soup
from embed2.model import EmbeddingModel, ModelConfig
from embed2.checkpoint import Checkpointer, load_model_params



def tiny(**kw):
  return ModelConfig.from_name("tiny", **kw)


def random_params(rng, cfg, scale=0.3):
  """A pure dict of fresh random float32 parameters with the model's tree."""
  shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: EmbeddingModel(cfg, rngs=nnx.Rngs(0))),
                                      nnx.Param))
  return jax.tree.map(lambda x: rng.normal(0, scale, x.shape).astype(np.float32), shapes)


OMIT = object()  # a meta value that leaves its key out


def save(directory, params, cfg, step=1, **meta):
  meta = {"model_config": cfg.to_dict(), "tokenizer": "", "task_strings": {}, "step": step, **meta}
  ck = Checkpointer(directory, keep=None, async_save=False)
  ck.save(step, params=jax.tree.map(jnp.asarray, params),
          meta={k: v for k, v in meta.items() if v is not OMIT}, force=True)
  ck.close()
  return str(directory / str(step))


_MODELS = {}


def restored(path, cfg):
  """The checkpoint's parameters as loaded by `load_model_params` (the path every consumer takes)."""
  if cfg not in _MODELS:  # filled with zeros: initialising the model for real compiles every initialiser
    model = nnx.eval_shape(lambda: EmbeddingModel(cfg, rngs=nnx.Rngs(1)))
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: jax.device_put(np.zeros(x.shape, x.dtype)), state))
    _MODELS[cfg] = model
  model = _MODELS[cfg]
  meta = load_model_params(model, path)
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))), meta


def as_np(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def one_device_mesh():
  return sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, request, fixture_rng):
  """Three random tiny checkpoints, their float32 params, and the config."""
  rng = fixture_rng(request)
  cfg = tiny()
  base = tmp_path_factory.mktemp("ingredients")
  params = [random_params(rng, cfg) for _ in range(3)]
  paths = [save(base / f"run{i}", p, cfg, step=10 * (i + 1), task_strings={f"t{i}": f"task {i}"})
           for i, p in enumerate(params)]
  return cfg, paths, params


# ---------------------------------------------------------------------------------- averages


def test_uniform_soup_of_copies_is_the_checkpoint(ckpts, tmp_path):
  cfg, paths, params = ckpts
  record = soup.make_soup([paths[0]] * 3, out=tmp_path / "soup", method="uniform")
  got, meta = restored(tmp_path / "soup", cfg)
  jax.tree.map(lambda g, p: np.testing.assert_allclose(g, p, rtol=1e-6, atol=1e-7), got, params[0])
  assert record["weights"] == pytest.approx([1 / 3] * 3)
  # The soup is a normal checkpoint: params + meta, no training state, a self-describing meta.
  assert sorted(p.name for p in (tmp_path / "soup" / "0").iterdir() if p.is_dir()) == ["meta", "params"]
  assert ModelConfig.from_dict(meta["model_config"]) == cfg and meta["soup"]["method"] == "uniform"
  assert "data_state" not in meta
  on_disk = json.loads((tmp_path / "soup" / "soup.json").read_text())
  assert on_disk["ingredients"][0]["step"] == 10 and on_disk["checkpoint"].endswith("/0")


def test_weights_are_applied_exactly(ckpts, tmp_path, rng):
  cfg, paths, params = ckpts
  w = rng.uniform(0.1, 3.0, 3)
  record = soup.make_soup(paths, out=tmp_path / "soup", method="weighted", weights=list(w))
  got, meta = restored(tmp_path / "soup", cfg)
  wn = w / w.sum()
  want = jax.tree.map(lambda *xs: sum(wi * x.astype(np.float64) for wi, x in zip(wn, xs)), *params)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=2e-6, atol=2e-7), got, want)
  np.testing.assert_allclose(record["weights"], wn, rtol=1e-12)
  # Task strings of every ingredient are kept (different task mixes).
  assert meta["task_strings"] == {"t0": "task 0", "t1": "task 1", "t2": "task 2"}
  # A zero weight drops an ingredient entirely.
  soup.make_soup(paths, out=tmp_path / "soup2", method="weighted", weights=[1, 0, 1])
  got, _ = restored(tmp_path / "soup2", cfg)
  want = jax.tree.map(lambda a, c: (a.astype(np.float64) + c) / 2, params[0], params[2])
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=2e-6, atol=2e-7), got, want)


@pytest.mark.parametrize("weights, method, match", [
    ([1, -1, 1], "weighted", ">= 0"),
    ([1, float("nan"), 1], "weighted", "finite"),
    ([1, float("inf"), 1], "weighted", "finite"),
    ([0, 0, 0], "weighted", "all zero"),
    ([1, 1], "weighted", "one weight per checkpoint"),
    (None, "weighted", "needs --weights"),
    ([1, 1, 1], "uniform", "only used with --method=weighted"),
    (None, "greedy", "needs a scorer"),
    (None, "mean", "choose one of"),
])
def test_bad_weights_and_methods_are_refused(ckpts, tmp_path, weights, method, match):
  _, paths, _ = ckpts
  with pytest.raises(ValueError, match=match):
    soup.make_soup(paths, out=tmp_path / "soup", method=method, weights=weights)
  assert not (tmp_path / "soup").exists()


# ------------------------------------------------------------------------------------ greedy


def test_greedy_soup_leaves_out_the_harmful_ingredient(tmp_path, rng):
  """Params T + c_u u + c_v v with unit-norm random trees u, v orthogonal; score = -|theta - T|^2.

  A = T + u and a copy A' score -1, C = T + 1.5u scores -2.25, B = T - u + 1.6v scores -3.56, so the
  order is A, A', C, B. {A, A'} ties A (added: the score does not drop); with C the soup sits at
  T + 1.17u (worse: refused); with B it sits at T + (u + 1.6v)/3, |.|^2 = 0.40 (better: added).
  """
  cfg = tiny()
  target = random_params(rng, cfg)
  u, v = random_params(rng, cfg, scale=1.0), random_params(rng, cfg, scale=1.0)
  dot = lambda a, b: sum(float(np.sum(x.astype(np.float64) * y)) for x, y in
                         zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  u = jax.tree.map(lambda x: x / np.sqrt(dot(u, u)), u)
  v = jax.tree.map(lambda x, y: x - dot(v, u) * y, v, u)
  v = jax.tree.map(lambda x: x / np.sqrt(dot(v, v)), v)
  make = lambda cu, cv: jax.tree.map(lambda t, a, b: (t + cu * a + cv * b).astype(np.float32),
                                     target, u, v)
  a, c, b = make(1.0, 0.0), make(1.5, 0.0), make(-1.0, 1.6)
  # Given order: B, C, A, A' so that sorting matters.
  paths = [save(tmp_path / name, p, cfg) for name, p in
           (("b", b), ("c", c), ("a", a), ("a2", a))]

  calls = []

  def score_fn(model):
    theta = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    d = jax.tree.map(lambda x, t: np.asarray(jax.device_get(x), np.float64) - t, theta, target)
    calls.append(1)
    return -dot(d, d)

  record = soup.make_soup(paths, out=tmp_path / "soup", method="greedy", score_fn=score_fn)
  assert record["greedy"]["order"] == [2, 3, 1, 0]
  assert [s["added"] for s in record["greedy"]["steps"]] == [True, True, False, True]
  assert record["greedy"]["selected"] == [0, 2, 3]
  assert record["weights"] == pytest.approx([1 / 3, 0, 1 / 3, 1 / 3])
  assert len(calls) == 4 + 3  # each ingredient, then each candidate soup
  scores = [i["score"] for i in record["ingredients"]]
  np.testing.assert_allclose(scores, [-3.56, -2.25, -1, -1], rtol=1e-4)
  np.testing.assert_allclose(record["soup"]["score"], -(1 + 1.6 ** 2) / 9, rtol=1e-4)
  got, _ = restored(tmp_path / "soup", cfg)
  want = jax.tree.map(lambda x, y: (2 * x.astype(np.float64) + y) / 3, a, b)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=2e-6, atol=2e-7), got, want)


def test_scorer_returning_metrics(ckpts):
  """A mapping-valued scorer: greedy selects by `metric`; uniform records every metric."""
  _, paths, params = ckpts
  first = lambda model: float(np.asarray(nnx.state(model, nnx.Param)["head"][0][...])[0, 0])
  fn = lambda model: {"x": first(model), "neg": -first(model)}
  mesh = one_device_mesh()
  _, rec, _ = soup.soup_params(paths, method="uniform", score_fn=fn, mesh=mesh)
  assert rec["metric"] is None and "score" in rec["soup"] and rec["soup"]["score"] is None
  np.testing.assert_allclose(rec["soup"]["metrics"]["x"], np.mean([p["head"][0][0, 0] for p in params]),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="with --metric"):
    soup.soup_params(paths, method="greedy", score_fn=fn, mesh=mesh)
  with pytest.raises(ValueError, match="returned no metric 'y'"):
    soup.soup_params(paths, method="greedy", score_fn=fn, metric="y", mesh=mesh)
  _, rec, _ = soup.soup_params(paths, method="greedy", score_fn=fn, metric="x", mesh=mesh)
  best = int(np.argmax([p["head"][0][0, 0] for p in params]))
  assert rec["greedy"]["order"][0] == best and best in rec["greedy"]["selected"]


# ---------------------------------------------------------------------------------- refusals


def test_different_architecture_is_refused(ckpts, tmp_path, rng):
  cfg, paths, _ = ckpts
  other = tiny(mlp_dim=96)
  p = save(tmp_path / "wide", random_params(rng, other), other)
  with pytest.raises(ValueError, match=r"model_config\.mlp_dim is 96 there and 128"):
    soup.soup_params([paths[0], p], mesh=one_device_mesh())
  # Fields that do not change the parameters may differ.
  same = tiny(dtype="bfloat16", remat="full", max_length=64, mrl_dims=(32, 64))
  q = save(tmp_path / "bf16", random_params(rng, cfg), same)
  soup.soup_params([paths[0], q], mesh=one_device_mesh())


def test_different_tree_is_refused(ckpts, tmp_path):
  cfg, paths, params = ckpts
  bad = jax.tree.map(lambda x: x, params[1])
  bad["transformer"]["blocks"][1]["mlp"]["up"] = np.zeros((64, 96), np.float32)
  p = save(tmp_path / "shape", bad, cfg)  # same meta, different shape
  with pytest.raises(ValueError, match=r"params/transformer/blocks/1/mlp/up is float32\[64, 96\] "
                     r"instead of float32\[64, 128\]"):
    soup.soup_params([paths[0], p], mesh=one_device_mesh())
  missing = jax.tree.map(lambda x: x, params[1])
  del missing["transformer"]["final_norm"]
  q = save(tmp_path / "missing", missing, cfg)
  with pytest.raises(ValueError, match=r"params/transformer/final_norm/scale is missing"):
    soup.soup_params([paths[0], q], mesh=one_device_mesh())
  dtype = jax.tree.map(lambda x: x, params[1])
  dtype["head"][0] = dtype["head"][0].astype(jnp.bfloat16)
  r = save(tmp_path / "dtype", dtype, cfg)
  with pytest.raises(ValueError, match=r"params/head/0 is bfloat16\[64, 64\] instead of float32"):
    soup.soup_params([paths[0], r], mesh=one_device_mesh())


def test_missing_or_unfinished_checkpoint_is_refused(ckpts, tmp_path):
  _, paths, _ = ckpts
  with pytest.raises(FileNotFoundError, match="does not exist"):
    soup.soup_params([paths[0], str(tmp_path / "nope")], mesh=one_device_mesh())
  # A save that never finished: Orbax's temporary directory, alone in its checkpoints directory.
  run = tmp_path / "killed"
  run.mkdir()
  tmp = run / "20.orbax-checkpoint-tmp-1234"
  shutil.copytree(paths[1], tmp)
  (tmp / "commit_success.txt").unlink(missing_ok=True)
  with pytest.raises(FileNotFoundError, match="unfinished"):
    soup.soup_params([paths[0], str(tmp)], mesh=one_device_mesh())
  with pytest.raises(FileNotFoundError, match=r"no finished checkpoint"):
    soup.soup_params([paths[0], str(run)], mesh=one_device_mesh())
  # A directory that holds no checkpoint at all.
  with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
    soup.soup_params([str(tmp_path)], mesh=one_device_mesh())


def test_out_is_never_clobbered(ckpts, tmp_path):
  cfg, paths, params = ckpts
  out = tmp_path / "soup"
  soup.make_soup(paths[:1], out=out)
  with pytest.raises(FileExistsError, match="--overwrite"):
    soup.make_soup(paths[1:2], out=out)
  soup.make_soup(paths[1:2], out=out, overwrite=True)
  got, _ = restored(out, cfg)
  jax.tree.map(lambda g, p: np.testing.assert_array_equal(g, p), got, params[1])
  assert json.loads((out / "soup.json").read_text())["ingredients"][0]["path"] == paths[1]
  assert not [p for p in out.iterdir() if ".tmp" in p.name]
  ingredient_dir = str(tmp_path / "run")
  p = save(tmp_path / "run", params[0], cfg)
  with pytest.raises(ValueError, match="holds the ingredient"):
    soup.make_soup([p], out=ingredient_dir, overwrite=True)
  workdir = tmp_path / "workdir"
  save(workdir / "checkpoints", params[0], cfg)
  with pytest.raises(ValueError, match="holds the ingredient"):
    soup.make_soup([str(workdir)], out=workdir / "checkpoints", overwrite=True)
  assert (workdir / "checkpoints" / "1" / "params").exists()


# ---------------------------------------------------------------------------------- sharding


@pytest.fixture(scope="module")
def sharded_ckpts(tmp_path_factory, request, fixture_rng):
  """Three random tiny checkpoints written from parameters sharded on a tensor=2 x fsdp=4 mesh."""
  rng = fixture_rng(request)
  cfg = tiny()
  base = tmp_path_factory.mktemp("sharded")
  rules = sharding.DEFAULT_RULES
  abstract = nnx.state(nnx.eval_shape(lambda: EmbeddingModel(cfg, rules=rules, rngs=nnx.Rngs(0))),
                       nnx.Param)
  write_mesh = sharding.make_mesh(dict(fsdp=4, tensor=2))
  shardings = nnx.to_pure_dict(sharding.param_shardings(abstract, write_mesh, rules))
  paths = []
  for i in range(3):
    params = jax.tree.map(jax.device_put, random_params(rng, cfg), shardings)
    assert params["transformer"]["embedder"]["embedding"].sharding.spec != jax.sharding.PartitionSpec()
    paths.append(save(base / f"w{i}", params, cfg))
  return paths


@pytest.mark.parametrize("mesh_shape", [dict(data=2, fsdp=2, tensor=2), dict(fsdp=8)])
def test_sharded_soup_equals_one_device(sharded_ckpts, mesh_shape, rng):
  """Ingredients written on one mesh, souped on 8 devices (another mesh) and on one device."""
  paths = sharded_ckpts
  w = list(rng.uniform(0.5, 2.0, 3))
  mesh = sharding.make_mesh(mesh_shape)
  sharded, _, _ = soup.soup_params(paths, method="weighted", weights=w, mesh=mesh)
  single, _, _ = soup.soup_params(paths, method="weighted", weights=w, mesh=one_device_mesh())
  # Each parameter lives on the 8-device mesh, split as the rules say (no host ever held it whole).
  q = sharded["transformer"]["blocks"][0]["attn"]["q"]  # (D, H, hd): embed -> fsdp, heads -> tensor
  assert q.sharding.mesh.devices.size == 8
  want_spec = sharding.logical_to_spec(("embed", "heads", "head_dim"), sharding.DEFAULT_RULES, mesh,
                                       q.shape)
  assert want_spec != jax.sharding.PartitionSpec(None, None, None)
  assert q.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, want_spec), q.ndim)
  assert q.addressable_shards[0].data.size < q.size
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               as_np(sharded), as_np(single))


# --------------------------------------------------------------------------------------- CLI


def test_cli_weighted(ckpts, tmp_path, capsys):
  cfg, paths, params = ckpts
  soup.main([f"--out={tmp_path / 'soup'}", "--method=weighted", "--weights=3,1", "--step=7",
             "--mesh=data=1,fsdp=-1", paths[0], paths[1]])
  got, meta = restored(tmp_path / "soup", cfg)
  want = jax.tree.map(lambda a, b: 0.75 * a.astype(np.float64) + 0.25 * b, params[0], params[1])
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=2e-6, atol=2e-7), got, want)
  assert meta["step"] == 7 and (tmp_path / "soup" / "7").is_dir()
  printed = capsys.readouterr().out
  assert "0.7500" in printed and "0.2500" in printed and str(tmp_path / "soup" / "7") in printed
  with pytest.raises(SystemExit, match="needs --suite"):
    soup.main([f"--out={tmp_path / 'g'}", "--method=greedy", paths[0]])
  with pytest.raises(app.UsageError, match="flag --mesh=data2: expected axis=size pairs"):
    soup.main([f"--out={tmp_path / 'g'}", "--mesh=data2", paths[0]])
  with pytest.raises(app.UsageError, match="at least one checkpoints"):
    soup.main([f"--out={tmp_path / 'g'}"])


# ------------------------------------------------------------------------------- tokenizers


def word_tokenizer_json(rng):
  """A small tokenizer.json (tokenizers WordLevel): pad/eos/bos/unk = 0..3 and the words "w4".."w59"
  at ids drawn from `rng` (so two draws are two different tokenizers)."""
  from tokenizers import Tokenizer as TK  # pylint: disable=g-import-not-at-top
  from tokenizers import AddedToken, models, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top
  ids = 4 + rng.permutation(56)
  vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3,
           **{f"w{i}": int(j) for i, j in zip(range(4, 60), ids)}}
  tk = TK(models.WordLevel(vocab, unk_token="<unk>"))
  tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "<eos>", "<bos>")])
  tk.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                    special_tokens=[("<bos>", 2), ("<eos>", 1)])
  return tk, vocab


@pytest.fixture
def tokenizers_seen(monkeypatch):
  """Replaces the suite evaluation with one that records the tokenizer of the Embedder it is given
  (what the suite would tokenize every query and document with)."""
  seen = []

  def evaluate_suite(embedder, suite, *, dims=None, data_dir=None):
    seen.append(embedder.tokenizer)
    return {"m": float(len(seen))}

  monkeypatch.setattr(soup, "evaluate_suite", evaluate_suite)
  return seen


def test_suite_scorer_embeds_with_each_checkpoints_own_tokenizer(tmp_path, rng, tokenizers_seen):
  """An import keeps its tokenizer beside its checkpoints; its meta names the folder it was imported
  to, which has moved since. The scored soup and the soup itself use that tokenizer, never the
  packaged one."""
  from embed2.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  from embed2.inference import Embedder  # pylint: disable=g-import-not-at-top
  cfg = tiny(vocab_size=Tokenizer.default().vocab_size)  # room for either tokenizer's ids
  tk, vocab = word_tokenizer_json(rng)
  imp = tmp_path / "imported"
  imp.mkdir()
  (imp / "tokenizer.json").write_text(tk.to_str())
  gone = tmp_path / "before_the_move" / "tokenizer.json"
  meta = dict(tokenizer=str(gone), tokenizer_kind="tokenizers", source={"hf_dir": "/models/st"})
  paths = [save(imp, random_params(rng, cfg), cfg, step=s, **meta) for s in (1, 2)]
  out = tmp_path / "soup"
  soup.main([f"--out={out}", "--suite=demo", *paths])
  assert len(tokenizers_seen) == 3  # two ingredients and the soup
  want = [vocab["<bos>"], vocab["w5"], vocab["w17"], vocab["<unk>"], vocab["<eos>"]]
  for tok in tokenizers_seen:
    assert tok.source == str(imp / "tokenizer.json")
    assert tok.encode("w5 w17 w99", add_bos=True, add_eos=True) == want
  # The soup keeps its own copy of the tokenizer, so it embeds with it after its ingredients are gone
  # and after it moved.
  emb = Embedder.from_checkpoint(str(out), mesh=one_device_mesh())
  assert emb.tokenizer.source == str(out / "tokenizer.json")
  assert emb.tokenizer.encode("w5 w17 w99", add_bos=True, add_eos=True) == want
  shutil.rmtree(imp)
  out.rename(tmp_path / "moved_soup")
  emb = Embedder.from_checkpoint(str(tmp_path / "moved_soup"), mesh=one_device_mesh())
  assert emb.tokenizer.source == str(tmp_path / "moved_soup" / "tokenizer.json")
  assert emb.tokenizer.encode("w5 w17 w99", add_bos=True, add_eos=True) == want
  # A run trained on the packaged tokenizer (meta "") is scored with it.
  run = save(tmp_path / "run", random_params(rng, cfg), cfg)
  tokenizers_seen.clear()
  soup.main([f"--out={tmp_path / 'soup2'}", "--suite=demo", run])
  assert [t.source for t in tokenizers_seen] == [Tokenizer.default().source] * 2


@pytest.mark.parametrize("meta,match", [
    (dict(tokenizer=OMIT), "names no tokenizer in its meta"),
    (dict(tokenizer="", source={"hf_dir": "/models/st"}), "without its tokenizer .* re-import it"),
    (dict(tokenizer="/nowhere/tokenizer.json"), "tokenizer /nowhere/tokenizer.json, which is missing"),
], ids=["no_tokenizer", "import_without_one", "missing_file"])
def test_a_checkpoint_without_its_own_tokenizer_is_refused(tmp_path, rng, tokenizers_seen, meta,
                                                          match):
  """Never the packaged tokenizer in place of the checkpoint's: neither the scorer nor the soup."""
  from embed2.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  cfg = tiny(vocab_size=Tokenizer.default().vocab_size)  # the packaged tokenizer would fit this model
  path = save(tmp_path / "ckpt", random_params(rng, cfg), cfg, **meta)
  with pytest.raises(SystemExit, match=f"embed2.soup: .*{match}"):
    soup.main([f"--out={tmp_path / 'soup'}", "--suite=demo", path])
  assert not tokenizers_seen
  with pytest.raises((ValueError, FileNotFoundError), match=f"soup ingredient {path}: .*{match}"):
    soup.soup_params([path, path], mesh=one_device_mesh())
  assert not (tmp_path / "soup").exists()


def test_ingredients_of_different_tokenizers_are_refused(tmp_path, rng):
  """Two files of one tokenizer are one tokenizer; two different tokenizers cannot be averaged."""
  cfg = tiny()
  tk, _ = word_tokenizer_json(rng)
  other, _ = word_tokenizer_json(rng)
  paths = {}
  for name, t in (("a", tk), ("a_copy", tk), ("b", other)):
    (tmp_path / name).mkdir()
    (tmp_path / name / "tokenizer.json").write_text(t.to_str())
    paths[name] = save(tmp_path / name, random_params(rng, cfg), cfg,
                       tokenizer=str(tmp_path / name / "tokenizer.json"))
  _, rec, _ = soup.soup_params([paths["a"], paths["a_copy"]], mesh=one_device_mesh())
  assert rec["weights"] == [0.5, 0.5]
  with pytest.raises(ValueError, match=r"soup ingredient .*b/1 was made with the tokenizer "
                                       r".*b/tokenizer.json and .*a/1 with another one"):
    soup.soup_params([paths["a"], paths["b"]], mesh=one_device_mesh())
