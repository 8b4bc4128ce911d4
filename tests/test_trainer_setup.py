"""What the trainer settles before its first step: every stage's freeze patterns, and where the initial
weights come from (`config.init_from`, `config.vision_init_from`)."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from embed2 import checkpoint as ckpt_lib
from embed2 import sharding
from embed2.main import resolve_tasks
from embed2.model import ModelConfig
from embed2.model.presets import MediaConfig
from embed2.model import vision
from embed2.model.frontends import ViTImageFrontend
from embed2.train import trainer

VIT = dict(image_frontend="vit", image_size=16, patch_size=4, image_tokens=4, vit_width=32, vit_depth=1,
           vit_heads=4, vit_mlp_dim=48)


def test_a_bad_freeze_pattern_of_a_later_stage_stops_the_run_before_its_first_step(tmp_path):
  # Before, stage 1's pattern was checked when stage 1 began: after all of stage 0 had trained and
  # checkpointed, hours into a real run.
  c = tiny.get_config("pft_steps=2,ft_steps=2,every=1")
  c.stages[1].freeze = ("transformer/no_such_block",)
  with pytest.raises(ValueError, match=r"config\.stages\[1\]\.optim\.freeze pattern .*no_such_block"):
    trainer.train(c, str(tmp_path / "run"), resolve_tasks(c))
  assert not (tmp_path / "run" / "checkpoints").exists() or not list(
      (tmp_path / "run" / "checkpoints").iterdir())


def _vision_checkpoint(path, model_cfg, seed):
  vcfg = ViTImageFrontend.vision_config(model_cfg)
  siglip = vision.VisionEncoder(vcfg, rngs=nnx.Rngs(seed))
  ck = ckpt_lib.Checkpointer(path / "vision", async_save=False)
  ck.save(0, params=nnx.to_pure_dict(nnx.state(siglip, nnx.Param)), meta={"vision_config": vcfg.to_dict()},
          force=True)
  ck.close()
  return siglip


def test_vision_init_from_loads_without_init_from(tmp_path):
  # A text model trained from scratch with a pretrained SigLIP tower: before, vision_init_from was read
  # only inside the init_from branch and silently ignored here (the tower kept its random init).
  c = tiny.get_config()
  c.model.media = dict(VIT)
  model_cfg = ModelConfig.from_dict(c.model.to_dict())
  assert model_cfg.media == MediaConfig(**VIT)
  siglip = _vision_checkpoint(tmp_path / "conv", model_cfg, seed=3)
  c.vision_init_from = str(tmp_path / "conv")
  mesh = sharding.make_mesh(dict(c.mesh))
  rules = tuple(tuple(r) for r in c.sharding_rules)
  trainee = trainer.build_trainee(trainer.normalize(c), mesh, rules)
  for a, b in zip(jax.tree.leaves(nnx.state(siglip, nnx.Param)),
                  jax.tree.leaves(nnx.state(trainee.model.image_frontend.encoder, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_run_resumes_after_its_prepared_data_moves_but_not_onto_other_data(tmp_path):
  # A prepared dataset copied from a local disk to a bucket is the same data: the resume must not be
  # refused for the new data_dir (it was: config.tasks, data_dir included, is part of the fingerprint).
  def cfg(data_dir, source="tfds:embed2/stdlib_code_search:1.0.0"):
    c = tiny.get_config()
    name = next(iter(c.tasks))
    c.tasks[name].source = source
    c.tasks[name].data_dir = data_dir
    return trainer.normalize(c)

  meta = {"fingerprint": trainer._canonical(trainer.fingerprint(cfg(str(tmp_path / "local"))))}
  trainer.check_workdir_compatible(cfg("gs://bucket/prepared"), meta, tmp_path)
  with pytest.raises(ValueError, match=r"config\.tasks differs"):
    trainer.check_workdir_compatible(cfg("gs://bucket/prepared", source="tfds:embed2/other:1.0.0"), meta,
                                     tmp_path)
