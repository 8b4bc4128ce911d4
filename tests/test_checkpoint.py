"""Checkpoint -> model: `checkpoint.load_model` places a checkpoint's model on a mesh, shard by shard,
and every tool that loads a model (Embedder, the main job's soup evaluation) goes through it."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from embed2 import checkpoint as ckpt_lib
from embed2 import main as main_lib
from embed2 import sharding, soup
from embed2.train import trainer
from embed2.model import EmbeddingModel, ModelConfig


def _save(directory, params, cfg, step=3):
  ck = ckpt_lib.Checkpointer(directory, keep=None, async_save=False)
  ck.save(step, params=jax.tree.map(jnp.asarray, params), force=True,
          meta={"model_config": cfg.to_dict(), "tokenizer": "", "task_strings": {}, "step": step})
  ck.close()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, request, fixture_rng):
  """A tiny model's random parameters saved as a checkpoint; (directory, config, params)."""
  rng = fixture_rng(request)
  cfg = ModelConfig.from_name("tiny")
  shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: EmbeddingModel(cfg, rngs=nnx.Rngs(0))),
                                      nnx.Param))
  params = jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32), shapes)
  directory = tmp_path_factory.mktemp("ckpt") / "checkpoints"
  _save(directory, params, cfg)
  return directory, cfg, params


def _fsdp_mesh():
  return sharding.make_mesh({"data": 1, "fsdp": -1})


def _check_sharded(model, params, mesh):
  """Every parameter equals the saved one, lives on `mesh`, and the big ones are split over fsdp."""
  got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
  flat_want = dict(jax.tree_util.tree_leaves_with_path(params))
  assert flat_got.keys() == flat_want.keys()
  split = 0
  for path, x in flat_got.items():
    np.testing.assert_array_equal(np.asarray(x), flat_want[path], err_msg=jax.tree_util.keystr(path))
    assert x.sharding.mesh.shape == mesh.shape, jax.tree_util.keystr(path)
    shard = x.addressable_shards[0].data.shape
    if shard != x.shape:
      assert np.prod(shard) * mesh.shape["fsdp"] == np.prod(x.shape), jax.tree_util.keystr(path)
      split += 1
  assert split >= 1 + model.cfg.num_layers, "the embedding and each layer's matrices are split over fsdp"


def test_load_model_places_the_checkpoint_on_the_mesh_shard_by_shard(saved):
  directory, cfg, params = saved
  mesh = _fsdp_mesh()
  model, meta = ckpt_lib.load_model(directory, mesh=mesh)
  assert meta["step"] == 3 and model.cfg == cfg
  _check_sharded(model, params, mesh)
  bf16, _ = ckpt_lib.load_model(directory / "3", mesh=mesh, dtype="bfloat16")
  assert bf16.cfg.dtype == "bfloat16" and bf16.cfg.replace(dtype=cfg.dtype) == cfg
  blockwise, _ = ckpt_lib.load_model(directory, mesh=mesh, attention_impl="blockwise")
  assert blockwise.cfg.attention_impl == "blockwise"
  with pytest.raises(ValueError, match="attention_impl"):
    ckpt_lib.load_model(directory, mesh=mesh, attention_impl="fast")


def test_load_model_refuses_a_folder_without_a_model_config(tmp_path):
  ck = ckpt_lib.Checkpointer(tmp_path, keep=None, async_save=False)
  ck.save(1, params={"w": jnp.ones((2,))}, meta={"step": 1}, force=True)
  ck.close()
  with pytest.raises(ValueError, match="no model_config"):
    ckpt_lib.load_model(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ckpt_lib.load_model(tmp_path / "nothing")


def test_main_soup_evaluation_loads_each_model_sharded_on_the_run_mesh(saved, tmp_path):
  """Regression: run_soup built each ingredient and the soup unsharded on one device (a 4B soup does not
  fit there); it now loads them onto the run's mesh."""
  directory, cfg, params = saved
  workdir = tmp_path / "run"
  _save(workdir / "checkpoints", params, cfg)
  soup.make_soup([str(workdir / "checkpoints")], out=str(workdir / "soup"))
  (workdir / "eval").mkdir()
  config = ml_collections.ConfigDict({
      "model": cfg.to_dict(), "stages": [ml_collections.ConfigDict({"name": "ft"})],
      "soup": {"variants": []},
      "mesh": {"data": 1, "fsdp": -1}, "sharding_rules": [list(r) for r in sharding.DEFAULT_RULES]})
  mesh = _fsdp_mesh()
  seen = []

  def eval_fn(model, step, stage):
    _check_sharded(model, params, mesh)
    seen.append(stage)
    return {"eval/demo/code_search/ndcg@10/dim_8": 0.5}

  results = main_lib.run_soup(config, str(workdir), {}, eval_fn)
  assert seen == ["soup_ft", "soup_soup"]
  assert set(results) == {"ft", "soup"}
  assert json.loads((workdir / "eval" / "soup.json").read_text())["soup"] == {
      "code_search/ndcg@10/dim_8": 0.5}


def _tiny_media_config():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.model.media = dict(image_frontend="patch", image_size=32, patch_size=8, image_tokens=4,
                            audio_frontend="conv", sample_rate=8000, n_mels=16)
  return config


def _flat_fingerprint(config):
  """The fingerprint as runs wrote it before MediaConfig: the media fields flat in config.model."""
  fp = json.loads(json.dumps(trainer.fingerprint(config), sort_keys=True, default=str))
  model = dict(fp["model"])
  fp["model"] = {**{k: v for k, v in model.items() if k != "media"}, **model["media"]}
  return fp


def test_a_workdir_fingerprinted_before_media_config_resumes():
  """Regression (this session's MediaConfig): a run whose checkpoint stored config.model flat, media
  fields included, was refused as 'config.model differs' by the same config written nested."""
  config = _tiny_media_config()
  trainer.check_workdir_compatible(config, {"fingerprint": _flat_fingerprint(config)}, "w")
  changed = _flat_fingerprint(config)
  changed["model"]["image_size"] = 64
  with pytest.raises(ValueError, match="config.model differs"):
    trainer.check_workdir_compatible(config, {"fingerprint": changed}, "w")
