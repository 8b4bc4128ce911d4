"""Model soups: average the parameters of fine-tuned checkpoints into one checkpoint.

    python -m embed2.soup --out=/tmp/soup --method=uniform RUN_A/checkpoints RUN_B/checkpoints/2000
    python -m embed2.soup --out=/tmp/soup --method=weighted --weights=3,1 CKPT_A CKPT_B
    python -m embed2.soup --out=/tmp/soup --method=greedy --suite=demo \
        --metric=code_search/ndcg@10/dim_256 CKPT_A CKPT_B CKPT_C

A soup of ingredients theta_1..theta_N with weights w_i >= 0 is

  theta_soup = sum_i (w_i / sum_j w_j) theta_i

computed per parameter in float32 and written in the ingredients' dtype. The methods:

  uniform   w_i = 1.
  weighted  w_i given; they are normalised to sum to 1, so `--weights=3,1` is `--weights=0.75,0.25`.
  greedy    (Wortsman et al. 2022, "Model soups") sort the ingredients by a held-out score, best first;
            start from the best and add each next one only if the uniform soup with it scores at least
            as well as the soup without it. The selected ingredients are averaged uniformly.

An ingredient is any checkpoint `embed2.checkpoint.resolve_checkpoint_path` accepts: a step
directory, a checkpoints directory (its latest finished step) or a workdir. Before anything is restored,
every ingredient is checked against the first: same architecture (the meta's model config, ignoring
fields that do not change the parameters) and the same parameter tree (paths, shapes, dtypes, read from
the checkpoint's Orbax metadata, no array data), and the same tokenizer: each ingredient's own
(`embed2.data.tokenizer.checkpoint_tokenizer`, never a fallback), equal in content (the same file in two
places is one tokenizer). A checkpoint whose meta names no tokenizer, an import made without one, or one
whose tokenizer file is gone is refused. Only the `params` item is read; optimizer state is never souped.

Memory: ingredients are restored one at a time straight onto the target shardings on the mesh (each
process reads only its own shards, so a checkpoint written on another mesh works, and no parameter is
ever gathered whole onto one host) and added into a running float32 sum by a jitted, donating update.
At most three copies of the parameters live at once (sum, restored ingredient, and for greedy the
candidate soup the scorer sees).

The soup is a normal checkpoint `OUT/<step>/` with `params` and `meta` (no `train`), so
`load_model_params`, `Embedder.from_checkpoint`, evaluation and `config.init_from` take it;
`OUT/soup.json` (also copied into the meta under "soup") records the ingredients, weights, method and
every score. The soup keeps a copy of its ingredients' tokenizer in OUT (with a tokenizer.json's
tokenizer_config.json) and its meta names that copy, so the soup outlives the ingredients' folders and
moves with its own. A suite scorer embeds with that tokenizer.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import flags, logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from embed2 import checkpoint as ckpt_lib
from embed2 import cli
from embed2 import sharding
from embed2.data import tokenizer as tok_lib
from embed2.eval.suites import evaluate_suite
from embed2.inference import Embedder
from embed2.model import EmbeddingModel, ModelConfig

METHODS = ("uniform", "weighted", "greedy")

# Meta fields that describe how to resume training; a soup cannot be resumed, so they are dropped.
RESUME_FIELDS = ("data_state", "stage_index", "stage_step", "stage_name", "fingerprint",
                 "skipped_total", "process_count", "records_skipped", "records_read")

SOUP_JSON = "soup.json"

# A scorer returns a number (higher is better) or a mapping of metric name -> number (pick one with
# `metric`); it is called on every process with the model holding the candidate parameters.
ScoreFn = Callable[[EmbeddingModel], "float | Mapping[str, float]"]


# ------------------------------------------------------------------------------ ingredients


@dataclasses.dataclass(frozen=True, kw_only=True)
class Ingredient:
  """One finished checkpoint to soup.

  Attributes:
    path: the path as given.
    directory: the checkpoints directory holding the step.
    step: the step.
    meta: the checkpoint's meta dict.
    tree: flattened parameter metadata, "a/b/0/c" -> (shape, dtype name), in checkpoint order.
  """

  path: str
  directory: epath.Path
  step: int
  meta: dict[str, Any]
  tree: dict[str, tuple[tuple[int, ...], str]]

  @property
  def step_dir(self) -> epath.Path:
    return self.directory / str(self.step)

  @property
  def model_config(self) -> ModelConfig:
    return ModelConfig.from_dict(self.meta["model_config"])

  @functools.cached_property
  def tokenizer(self) -> tok_lib.Tokenizer:
    """The checkpoint's own tokenizer (`tokenizer.checkpoint_tokenizer`; read once).

    Raises:
      ValueError: the meta names no tokenizer, or the checkpoint is an import made without one.
      FileNotFoundError: the tokenizer it names is missing.
    """
    try:
      return tok_lib.checkpoint_tokenizer(self.meta, os.fspath(self.directory))
    except (ValueError, FileNotFoundError) as e:
      raise type(e)(f"soup ingredient {self.path}: {e}") from None


def _key_str(k) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _flat_paths(tree) -> dict[str, Any]:
  """{"transformer/blocks/0/attn/q": leaf, ...}: int and str dict keys spell the same."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_str(k) for k in path): leaf for path, leaf in leaves}


def open_ingredient(path: str | os.PathLike) -> Ingredient:
  """Resolves a checkpoint path and reads its meta and parameter metadata (no array data).

  Raises:
    FileNotFoundError: the path does not exist, or holds no finished checkpoint (an Orbax temporary
      directory `*.orbax-checkpoint-tmp-*` is an unfinished save and is never used).
    ValueError: the checkpoint has no `params` item or no model config in its meta.
  """
  p = epath.Path(path)
  if ".orbax-checkpoint-tmp" in p.name:
    raise FileNotFoundError(f"soup ingredient {path} is an unfinished checkpoint (an Orbax temporary "
                            "directory left by a save that did not complete); pass a finished step")
  try:
    directory, step = ckpt_lib.resolve_checkpoint_path(p)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"soup ingredient {path}: {e}") from None
  ck = ckpt_lib.Checkpointer(directory, read_only=True)
  if step not in ck.all_steps():
    raise FileNotFoundError(f"soup ingredient {path}: step {step} in {directory} is not a finished "
                            f"checkpoint (finished steps: {ck.all_steps()})")
  if not ck.has_item(step, "params"):
    raise ValueError(f"soup ingredient {path}: checkpoint {directory / str(step)} has no `params` item")
  meta = ck.read_meta(step)
  if "model_config" not in meta:
    raise ValueError(f"soup ingredient {path}: the meta of {directory / str(step)} has no model_config; "
                     "it was not written by embed2.checkpoint")
  # Orbax's metadata file: paths, shapes and dtypes of every array, without reading any array.
  md = ocp.StandardCheckpointHandler().metadata(directory / str(step) / "params")
  tree = {k: (tuple(int(s) for s in v.shape), np.dtype(v.dtype).name)
          for k, v in _flat_paths(getattr(md, "tree", md)).items()}
  return Ingredient(path=str(path), directory=directory, step=step, meta=meta, tree=tree)


_arch = ckpt_lib.architecture


def first_tree_mismatch(want: Mapping[str, tuple], have: Mapping[str, tuple]) -> str | None:
  """Describes the first path (in `want`'s order, then `have`'s) whose shape/dtype differ, or None."""
  for k in list(want) + [k for k in have if k not in want]:
    if k not in have:
      return f"params/{k} is missing"
    if k not in want:
      return f"params/{k} is unexpected"
    if tuple(want[k]) != tuple(have[k]):
      (ws, wd), (hs, hd) = want[k], have[k]
      return f"params/{k} is {hd}{list(hs)} instead of {wd}{list(ws)}"
  return None


def check_compatible(ingredients: Sequence[Ingredient]) -> None:
  """Refuses ingredients whose architecture, parameter tree or tokenizer differs from the first one's.

  Averaged token embeddings only mean something if every ingredient's ids name the same tokens, and
  the soup is embedded with its first ingredient's tokenizer: so all must have one and the same.

  Raises:
    ValueError naming the first differing model-config field, parameter path or tokenizer, or an
      ingredient whose meta names no tokenizer (see `Ingredient.tokenizer`).
    FileNotFoundError: an ingredient's tokenizer file is missing.
  """
  if not ingredients:
    raise ValueError("a soup needs at least one checkpoint")
  ref = ingredients[0]
  ref_arch = _arch(ref.model_config)
  for ing in ingredients[1:]:
    arch = _arch(ing.model_config)
    for k in ref_arch:
      if arch[k] != ref_arch[k]:
        raise ValueError(
            f"soup ingredient {ing.path} has a different architecture from {ref.path}: "
            f"model_config.{k} is {arch[k]!r} there and {ref_arch[k]!r} in the first ingredient; "
            "only checkpoints of one architecture can be averaged")
    diff = first_tree_mismatch(ref.tree, ing.tree)
    if diff:
      raise ValueError(f"soup ingredient {ing.path} has a different parameter tree from {ref.path}: "
                       f"{diff}; only checkpoints of one architecture can be averaged")
  for ing in ingredients[1:]:
    if not tok_lib.same_tokenizer(ing.tokenizer, ref.tokenizer):
      raise ValueError(
          f"soup ingredient {ing.path} was made with the tokenizer {ing.tokenizer.source} and "
          f"{ref.path} with another one, {ref.tokenizer.source}; only checkpoints of one tokenizer can "
          "be averaged (their token ids would mean different tokens)")


def normalize_weights(weights: Sequence[float] | None, n: int) -> np.ndarray:
  """float64 (N,) weights summing to 1; None = uniform.

  Raises:
    ValueError if the count differs from `n`, or a weight is negative or not finite, or all are zero.
  """
  if weights is None:
    return np.full((n,), 1.0 / n)
  w = np.asarray([float(x) for x in weights], np.float64)
  if w.shape != (n,):
    raise ValueError(f"--weights has {w.size} values for {n} checkpoints; give one weight per "
                     "checkpoint")
  if not np.all(np.isfinite(w)) or np.any(w < 0):
    raise ValueError(f"--weights={w.tolist()} must be finite and >= 0")
  if w.sum() <= 0:
    raise ValueError(f"--weights={w.tolist()} are all zero; give at least one positive weight")
  return w / w.sum()


# ----------------------------------------------------------------------------------- arrays


# The arithmetic, compiled once per parameter tree and sharding (shardings follow the inputs: every op
# is elementwise). Donation lets XLA write each result into a buffer that is no longer needed (the sum
# being replaced, or an ingredient already added), which keeps the peak at about three copies of the
# parameters; only one input can alias the output, so only one is donated.


def _f32(tree):
  return jax.tree.map(lambda b: b.astype(jnp.float32), tree)


def _start_fn(x, w):  # w x
  return jax.tree.map(lambda b: w * b, _f32(x))


def _add_fn(acc, x, w):  # acc + w x
  return jax.tree.map(lambda a, b: a + w * b, acc, _f32(x))


def _finish_fn(acc, w, dtypes):  # w acc, cast leaf by leaf to `dtypes` (names, in leaf order)
  leaves, treedef = jax.tree.flatten(acc)
  return jax.tree.unflatten(treedef, [(w * a).astype(d) for a, d in zip(leaves, dtypes)])


_start = jax.jit(_start_fn, donate_argnums=0)
_add = jax.jit(_add_fn, donate_argnums=0)
_add_into_x = jax.jit(_add_fn, donate_argnums=1)
_finish = jax.jit(_finish_fn, donate_argnums=0, static_argnums=2)
_finish_keep = jax.jit(_finish_fn, static_argnums=2)


class _Target:
  """The mesh, the abstract model and the restore target for one architecture."""

  def __init__(self, ingredient: Ingredient, mesh, rules):
    self.mesh = mesh
    cfg = ingredient.model_config
    abstract = sharding.abstract_sharded(lambda: EmbeddingModel(cfg, rules=rules, rngs=nnx.Rngs(0)),
                                         mesh, rules)
    self.graphdef, state = nnx.split(abstract)
    params = nnx.state(abstract, nnx.Param)
    if len(jax.tree.leaves(state)) != len(jax.tree.leaves(params)):
      raise ValueError("the model holds state other than parameters; embed2.soup only knows how to "
                       "build a scoring model from parameters")
    shapes = nnx.to_pure_dict(params)  # ShapeDtypeStructs with the target shardings
    # The model built from the config must have the checkpoint's paths and shapes. Dtypes are taken
    # from the checkpoint, so that nothing is cast on restore.
    diff = first_tree_mismatch({k: (tuple(v.shape), "") for k, v in _flat_paths(shapes).items()},
                               {k: (s, "") for k, (s, _) in ingredient.tree.items()})
    if diff:
      raise ValueError(f"checkpoint {ingredient.path} does not match the model its own model_config "
                       f"builds: {diff}")
    path_str = lambda path: "/".join(_key_str(k) for k in path)
    self.abstract = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.ShapeDtypeStruct(x.shape, np.dtype(ingredient.tree[path_str(p)][1]),
                                          sharding=x.sharding), shapes)
    self._shapes = shapes
    self._state = state
    self.model: EmbeddingModel | None = None
    self.dtypes = tuple(np.dtype(a.dtype).name for a in jax.tree.leaves(self.abstract))
    self._checkpointers: dict[str, ckpt_lib.Checkpointer] = {}

  def finish(self, acc, w: float, *, donate: bool = True):
    """w * acc in the ingredients' dtypes."""
    return (_finish if donate else _finish_keep)(acc, jnp.float32(w), self.dtypes)

  def restore(self, ing: Ingredient) -> Any:
    """The ingredient's parameters, restored shard by shard onto the target shardings."""
    logging.info("soup: restoring %s (step %d)", ing.step_dir, ing.step)
    key = os.fspath(ing.directory)
    if key not in self._checkpointers:
      self._checkpointers[key] = ckpt_lib.Checkpointer(ing.directory, read_only=True)
    return self._checkpointers[key].restore(ing.step, params=self.abstract)["params"]

  def set_model(self, params) -> EmbeddingModel:
    """The scoring model, now holding `params` (its previous arrays are released)."""
    if self.model is None:
      self.model = nnx.merge(self.graphdef, self._state)
    state = nnx.state(self.model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(self.model, state)
    return self.model

  def release_model(self) -> None:
    """Drops the scoring model's references to its arrays, so they can be freed before the next step."""
    if self.model is not None:
      state = nnx.state(self.model, nnx.Param)
      nnx.replace_by_pure_dict(state, self._shapes)
      nnx.update(self.model, state)


def _score(score_fn: ScoreFn, target: _Target, params, metric: str | None, what: str):
  """Runs the scorer on a model holding `params`; returns (score or None, metrics dict or None)."""
  model = target.set_model(params)
  with jax.set_mesh(target.mesh):
    out = score_fn(model)
  if isinstance(out, Mapping):
    metrics = {str(k): float(v) for k, v in out.items()}
    if metric is None:
      return None, metrics
    if metric not in metrics:
      raise ValueError(f"the scorer returned no metric {metric!r} (for {what}); it returned "
                       f"{sorted(metrics)}; pick one of them with --metric")
    score = metrics[metric]
  else:
    if metric is not None:
      raise ValueError(f"metric={metric!r} was given but the scorer returns a single number")
    score, metrics = float(out), None
  if math.isnan(score):
    logging.warning("soup: %s scored nan; it counts as the worst score", what)
  logging.info("soup: %s scores %s", what, score)
  return score, metrics


def _key(score: float | None) -> float:
  return -math.inf if score is None or math.isnan(score) else score


# ------------------------------------------------------------------------------------ soups


def default_mesh() -> jax.sharding.Mesh:
  """Every device on `fsdp`: parameters split as finely as the rules allow."""
  return sharding.make_mesh({"fsdp": -1})


def soup_params(paths: Sequence[str | os.PathLike], *, method: str = "uniform",
                weights: Sequence[float] | None = None, score_fn: ScoreFn | None = None,
                metric: str | None = None, mesh: jax.sharding.Mesh | None = None,
                rules=sharding.DEFAULT_RULES) -> tuple[dict[str, Any], dict[str, Any], list[Ingredient]]:
  """Averages checkpoints on the mesh, without writing anything.

  Args:
    paths: N checkpoints (step dirs, checkpoints dirs or workdirs); the same one may repeat.
    method: "uniform", "weighted" or "greedy" (see the module docstring).
    weights: N non-negative weights for "weighted" (normalised to sum 1); None otherwise.
    score_fn: scorer, higher is better (required for "greedy"; optional otherwise, then each ingredient
      and the soup are scored and recorded). Called with an EmbeddingModel holding the candidate's
      parameters, inside `jax.set_mesh(mesh)`.
    metric: with a scorer returning a mapping, the key greedy selection uses.
    mesh: where the parameters live; default: every device on the `fsdp` axis.
    rules: logical-axis rules mapping parameters to the mesh.

  Returns:
    (params, record, ingredients): the soup as a nested dict of jax.Arrays sharded on the mesh, in the
    ingredients' dtypes; the JSON-able record of how it was made; the opened ingredients.
  """
  if method not in METHODS:
    raise ValueError(f"--method={method!r}; choose one of {METHODS}")
  if method != "weighted" and weights is not None:
    raise ValueError(f"--weights is only used with --method=weighted (got --method={method})")
  if method == "weighted" and weights is None:
    raise ValueError("--method=weighted needs --weights, one per checkpoint")
  if method == "greedy" and score_fn is None:
    raise ValueError("--method=greedy needs a scorer: --suite and --metric on the command line, "
                     "score_fn in Python")
  if not paths:
    raise ValueError("a soup needs at least one checkpoint")
  w = normalize_weights(weights, len(paths))  # before any I/O: bad flags fail fast
  ingredients = [open_ingredient(p) for p in paths]
  check_compatible(ingredients)
  mesh = mesh if mesh is not None else default_mesh()
  target = _Target(ingredients[0], mesh, rules)

  record: dict[str, Any] = {
      "method": method, "metric": metric,
      "ingredients": [{"path": i.path, "checkpoint": str(i.step_dir), "step": i.step}
                      for i in ingredients],
  }
  scored = score_fn is not None
  if method == "greedy":
    params, w = _greedy(ingredients, target, score_fn, metric, record)
  else:
    acc = None
    for i, ing in enumerate(ingredients):
      x = target.restore(ing)
      wi = jnp.float32(w[i])
      if scored:
        s, m = _score(score_fn, target, x, metric, f"ingredient {i} ({ing.path})")
        record["ingredients"][i].update(score=s, metrics=m)
        target.release_model()
      acc = _start(x, wi) if acc is None else _add(acc, x, wi)
      del x
    params = target.finish(acc, 1.0)
    del acc
    if scored:
      s, m = _score(score_fn, target, params, metric, "the soup")
      record["soup"] = {"score": s, "metrics": m}
  for i, wi in enumerate(w):
    record["ingredients"][i]["weight"] = float(wi)
  record["weights"] = [float(x) for x in w]
  target.model = None
  return params, record, ingredients


def _greedy(ingredients, target: _Target, score_fn, metric, record):
  """Greedy soup; fills `record` and returns (params, float64 weights)."""
  n = len(ingredients)
  scores = []
  for i, ing in enumerate(ingredients):
    s, m = _score(score_fn, target, target.restore(ing), metric, f"ingredient {i} ({ing.path})")
    record["ingredients"][i].update(score=s, metrics=m)
    scores.append(s)
  if metric is None and any(s is None for s in scores):
    raise ValueError("--method=greedy needs one number per candidate: the scorer returns several "
                     "metrics, so name the one to select by with --metric")
  order = sorted(range(n), key=lambda i: -_key(scores[i]))  # stable: ties keep the given order
  target.release_model()
  best = order[0]
  one = jnp.float32(1.0)
  total = _start(target.restore(ingredients[best]), one)  # float32 running sum
  selected, best_score = [best], scores[best]
  record["soup"] = {"score": best_score, "metrics": record["ingredients"][best].get("metrics")}
  steps = [{"ingredient": best, "score": best_score, "added": True}]
  for i in order[1:]:
    # The sum with candidate i is kept beside the current sum until the scorer decides.
    candidate_sum = _add_into_x(total, target.restore(ingredients[i]), one)
    s, m = _score(score_fn, target, target.finish(candidate_sum, 1 / (len(selected) + 1), donate=False),
                  metric, f"the soup of ingredients {sorted(selected + [i])}")
    target.release_model()
    # "Does not drop": ties are added (more ingredients, same held-out score, usually better OOD).
    added = _key(s) >= _key(best_score)
    steps.append({"ingredient": i, "score": s, "metrics": m, "added": added})
    if added:
      total, best_score = candidate_sum, s
      selected.append(i)
      record["soup"] = {"score": s, "metrics": m}
    del candidate_sum
  record["greedy"] = {"order": order, "steps": steps, "selected": sorted(selected)}
  w = np.zeros((n,), np.float64)
  w[selected] = 1.0 / len(selected)
  params = target.finish(total, 1.0 / len(selected))
  return params, w


# ------------------------------------------------------------------------------------ output


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _existing(out: epath.Path) -> list[epath.Path]:
  """What in `out` makes it a checkpoint directory: step dirs, unfinished saves, a soup.json."""
  if not out.exists():
    return []
  return sorted(p for p in out.iterdir()
                if (p.is_dir() and (p.name.isdigit() or ".orbax-checkpoint-tmp" in p.name))
                or p.name == SOUP_JSON)


def check_out(out: str | os.PathLike, paths: Sequence[str | os.PathLike], overwrite: bool) -> epath.Path:
  """Refuses an --out that is a file, an ingredient's directory, or (without overwrite) a checkpoint."""
  out = epath.Path(out)
  if out.exists() and not out.is_dir():
    raise ValueError(f"--out={out} is a file; give a directory for the soup checkpoint")
  real = lambda p: os.fspath(p).rstrip("/") if ckpt_lib.is_remote(p) else os.path.realpath(os.fspath(p))
  for p in paths:
    places = [real(p)]
    try:  # a workdir's or step's checkpoints directory too (a missing path is refused later)
      places.append(real(ckpt_lib.resolve_checkpoint_path(p)[0]))
    except FileNotFoundError:
      pass
    if any(q == real(out) or q.startswith(real(out) + "/") for q in places):
      raise ValueError(f"--out={out} holds the ingredient {p}; write the soup to another directory")
  if _existing(out) and not overwrite:
    names = [p.name for p in _existing(out)]
    raise FileExistsError(f"--out={out} already holds a checkpoint ({names}); "
                          "pass --overwrite to replace it or choose another --out")
  return out


def _soup_meta(ingredients: Sequence[Ingredient], record: dict[str, Any], step: int) -> dict[str, Any]:
  meta = {k: v for k, v in ingredients[0].meta.items() if k not in RESUME_FIELDS}
  if meta.get("tokenizer"):  # "" (the packaged one) stays ""; a file is named where it was found (then
    source = ingredients[0].tokenizer.source  # (copied by write_soup)
    meta["tokenizer"] = source if ckpt_lib.is_remote(source) else os.path.abspath(source)
  # Ingredients fine-tuned on different task mixes: the soup knows every task string (first one wins).
  task_strings: dict[str, str] = {}
  for ing in ingredients:
    for name, s in (ing.meta.get("task_strings") or {}).items():
      task_strings.setdefault(name, s)
  meta.update(step=step, task_strings=task_strings, soup=record)
  return meta


# A tokenizer.json reads `split_special_tokens` from the tokenizer_config.json beside it: both travel.
_TOKENIZER_COMPANIONS = ("tokenizer_config.json",)


def _with_own_tokenizer(out: epath.Path, meta: dict[str, Any]) -> dict[str, Any]:
  """`meta` naming a copy of its tokenizer inside `out`, so the soup outlives its ingredients' folders
  (and moves with its own; `tokenizer.checkpoint_tokenizer` looks beside the checkpoint)."""
  name = meta.get("tokenizer") or ""
  if not name:  # the packaged tokenizer
    return meta
  src = epath.Path(name)
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    # Written before the soup's checkpoint, which is what makes the soup: a kill in between leaves no
    # soup, and the remade one writes the copy again (epath: also on object stores).
    for f in [src] + [src.parent / c for c in _TOKENIZER_COMPANIONS if src.suffix == ".json"]:
      if f.exists() and os.fspath(f) != os.fspath(out / f.name):
        (out / f.name).write_bytes(f.read_bytes())
  _sync("embed2_soup_tokenizer")
  return {**meta, "tokenizer": str(out / src.name)}


def write_soup(out: str | os.PathLike, params, meta: dict[str, Any], record: dict[str, Any], *,
               step: int = 0, overwrite: bool = False) -> epath.Path:
  """Writes `OUT/<step>/` (params + meta, via Orbax's temporary-dir-and-rename) then `OUT/soup.json`.

  Returns:
    the step directory.
  """
  out = epath.Path(out)
  if jax.process_index() == 0:
    old = _existing(out)
    if old and not overwrite:
      raise FileExistsError(f"--out={out} already holds a checkpoint; pass --overwrite")
    for p in old:
      logging.info("soup: --overwrite removes %s", p)
      if p.is_dir():
        p.rmtree()
      else:
        p.unlink()
  _sync("embed2_soup_cleared")
  meta = _with_own_tokenizer(out, meta)
  ck = ckpt_lib.Checkpointer(out, keep=None, async_save=False)
  ck.save(step, params=params, meta=meta, force=True)
  ck.close()
  if jax.process_index() == 0:
    text = json.dumps(record, indent=2, default=str)
    if ckpt_lib.is_remote(out):  # an object appears whole or not at all
      (out / SOUP_JSON).write_text(text)
    else:  # a local file is renamed into place whole
      tmp = out / f".{SOUP_JSON}.tmp-{os.getpid()}"
      tmp.write_text(text)
      tmp.replace(out / SOUP_JSON)
  _sync("embed2_soup_written")
  return out / str(step)


def make_soup(paths: Sequence[str | os.PathLike], *, out: str | os.PathLike, method: str = "uniform",
              weights: Sequence[float] | None = None, score_fn: ScoreFn | None = None,
              metric: str | None = None, mesh: jax.sharding.Mesh | None = None,
              rules=sharding.DEFAULT_RULES, step: int = 0, overwrite: bool = False) -> dict[str, Any]:
  """Soups `paths` (see `soup_params` for the arguments) and writes the soup checkpoint to `out`.

  The soup is `out/<step>/` (params + meta, no training state) and `out/soup.json`.

  Returns:
    the record written to soup.json: method, metric, weights (normalised), per-ingredient path,
    checkpoint, step, weight, score and metrics (when scored), the soup's score/metrics, the greedy
    trajectory, and "checkpoint": the soup's step directory.
  """
  out = check_out(out, paths, overwrite)  # before the expensive part
  mesh = mesh if mesh is not None else default_mesh()
  params, record, ingredients = soup_params(paths, method=method, weights=weights, score_fn=score_fn,
                                            metric=metric, mesh=mesh, rules=rules)
  record["checkpoint"] = str(out / str(step))
  record["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  record["mesh"] = {k: int(v) for k, v in mesh.shape.items()}
  write_soup(out, params, _soup_meta(ingredients, record, step), record, step=step, overwrite=overwrite)
  logging.info("soup: wrote %s", record["checkpoint"])
  return record


# --------------------------------------------------------------------------------------- CLI


def suite_scorer(suite: str, *, meta: Mapping[str, Any], directory: str | os.PathLike,
                 dims: Sequence[int] | None = None,
                 data_dir: str | os.PathLike | None = None) -> ScoreFn:
  """A scorer that runs the evaluation suite `suite` (embed2.eval.suites) and returns all its metrics.

  Args:
    suite: a suite name, e.g. "demo".
    meta: the first ingredient's meta: its tokenizer and task strings are used.
    directory: that ingredient's checkpoints directory (`Ingredient.directory`), where an import
      keeps its tokenizer.
    dims: MRL dims to evaluate; default all the model's.
    data_dir: where the suite's data lives (default: the suite's own default).

  Raises:
    ValueError / FileNotFoundError: the checkpoint names no tokenizer, or its tokenizer is missing
      (`tokenizer.checkpoint_tokenizer`: a checkpoint is never scored with another tokenizer).
  """
  tokenizer = tok_lib.checkpoint_tokenizer(dict(meta), os.fspath(directory))
  task_strings = dict(meta.get("task_strings") or {})
  held: dict[str, Any] = {}

  def score(model):
    # The soup updates one model in place, and an Embedder reads the current parameters at every call,
    # so one Embedder (and its compiled length buckets) serves every candidate.
    if held.get("model") is not model:
      held["model"], held["embedder"] = model, Embedder(model, tokenizer, task_strings=task_strings)
    return evaluate_suite(held["embedder"], suite, dims=dims, data_dir=data_dir)

  return score


FLAGS = flags.FlagValues()  # this program's own flags (embed2/cli.py says why)
flags.DEFINE_string("out", None, "directory for the soup checkpoint and soup.json", flag_values=FLAGS)
flags.DEFINE_enum("method", "uniform", METHODS, "how the ingredients are weighted (module docstring)",
                  flag_values=FLAGS)
flags.DEFINE_string("weights", None, "comma-separated, one per checkpoint (weighted); normalised to sum 1",
                    flag_values=FLAGS)
flags.DEFINE_string("suite", None, "evaluation suite that scores ingredients and the soup",
                    flag_values=FLAGS)
flags.DEFINE_string("metric", None, "suite metric greedy selects by, e.g. code_search/ndcg@10/dim_256",
                    flag_values=FLAGS)
flags.DEFINE_string("dims", None, "comma-separated MRL dims to evaluate (default: all)",
                    flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "evaluation data (default: $EMBED2_DATA_DIR or ~/embed2_data)",
                    flag_values=FLAGS)
cli.DEFINE_mesh("mesh", "fsdp=-1", "mesh axis sizes", flag_values=FLAGS)
flags.DEFINE_integer("step", 0, "step number of the soup checkpoint", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "replace a checkpoint already in --out", flag_values=FLAGS)
flags.mark_flag_as_required("out", flag_values=FLAGS)


def _run(args: cli.Args) -> dict[str, Any]:
  if args.method == "greedy" and not args.suite:
    raise ValueError("--method=greedy needs --suite (and --metric) to score the candidates")
  if args.metric and not args.suite:
    raise ValueError("--metric needs --suite")
  weights = [float(x) for x in args.weights.split(",")] if args.weights else None
  score_fn = None
  if args.suite:
    first = open_ingredient(args.checkpoints[0])
    dims = [int(d) for d in args.dims.split(",")] if args.dims else None
    score_fn = suite_scorer(args.suite, meta=first.meta, directory=first.directory, dims=dims,
                            data_dir=args.data_dir)
  mesh = sharding.make_mesh(args.mesh)
  return make_soup(args.checkpoints, out=args.out, method=args.method, weights=weights,
                   score_fn=score_fn, metric=args.metric, mesh=mesh, step=args.step,
                   overwrite=args.overwrite)


def main(argv: Sequence[str]) -> dict[str, Any]:
  """The command line after the program name (flags, then the ingredients: step dirs, checkpoints
  dirs or workdirs) -> the soup's record (soup.json)."""
  args = cli.parse(FLAGS, argv, positional="checkpoints")
  try:
    record = _run(args)
  except (ValueError, FileNotFoundError, FileExistsError) as e:  # refusals: the message says the fix
    raise SystemExit(f"embed2.soup: {e}") from e
  fmt = lambda x: "-" if x is None else f"{x:.4f}"
  print(f"{'#':>3s} {'weight':>8s} {'score':>8s}  checkpoint")
  for i, ing in enumerate(record["ingredients"]):
    print(f"{i:3d} {ing['weight']:8.4f} {fmt(ing.get('score')):>8s}  {ing['checkpoint']}")
  print(f"{'soup':>12s} {fmt((record.get('soup') or {}).get('score')):>8s}  {record['checkpoint']}"
        f"  ({args.method}; record in {epath.Path(args.out) / SOUP_JSON})")
  return record


if __name__ == "__main__":
  cli.run(main, FLAGS)
