"""Every config in configs/ builds, passes the trainer's data-free checks, and its sweep has members.

Nothing is trained or loaded: the checks are the ones `trainer.validate` makes before compiling
(model fields, stage modes, task names and rates, batch shapes against the data shards, optimizer and
loss fields), with one stand-in example per task instead of the task's data.
"""

import importlib
import pathlib

import pytest
from absl import flags
from ml_collections import config_dict, config_flags

from data_pipelines import tasks as task_defs
from embed2.model import ModelConfig
from embed2.model.vision import VisionConfig
from embed2.train import trainer

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "common"))
NUM_GROUPS = 8  # the data shards of the 8 simulated devices


def test_the_configs_are_found():
  assert {"demo", "tiny", "ft_embeddinggemma_300m", "pft_gemma3_1b", "pft_gemma3_4b"} <= set(NAMES)


def _batch_specs(config):
  for si, stage in enumerate(config.stages):
    if stage.mode == "pft":
      yield f"stages[{si}].batch", stage.batch
    else:
      for name, rate in dict(stage.tasks).items():
        if rate > 0:
          yield f"tasks.{name}", config.tasks[name]


@pytest.mark.parametrize("name", NAMES)
def test_config_builds_and_validates(name):
  module = importlib.import_module(f"configs.{name}")
  config = trainer.normalize(module.get_config())
  assert isinstance(config, config_dict.ConfigDict)
  model = ModelConfig.from_dict(config.model.to_dict())
  for si, stage in enumerate(config.stages):
    assert stage.mode in ("pft", "ft") and int(stage.steps) >= 1, (name, si)
  # Every task names a known source; one stand-in example each is all validate() looks at.
  for task, tc in config.tasks.items():
    assert tc.get("source", task) in task_defs.TASKS, (name, task)
  data = {task: trainer.TaskData(train=[{}]) for task in config.tasks}
  trainer.validate(config, data, NUM_GROUPS)
  # A row packs at most model.max_segments examples; the batch's slot indices assume as many.
  for where, spec in _batch_specs(config):
    assert trainer.batch_spec(spec, where).segments == model.max_segments, (name, where)
  if config.get("init_from"):  # a converted checkpoint brings its own tokenizer: "" takes it
    assert config.tokenizer == "", f"{name}: leave config.tokenizer empty, to train with init_from's own"


@pytest.mark.parametrize("name", NAMES)
def test_sweep_has_members(name):
  module = importlib.import_module(f"configs.{name}")
  if not hasattr(module, "sweep"):
    pytest.skip(f"configs/{name}.py has no sweep()")
  members = module.sweep()
  assert members and all(isinstance(m, dict) and m for m in members)
  config = module.get_config()
  for m in members:  # every override names a field that exists
    for key in m:
      node, parts = config, key.replace("]", "").replace("[", ".").split(".")
      for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node[part]
      assert parts[-1] in node, (name, key)


def test_knobs_reach_the_config():
  from configs import ft_embeddinggemma_300m, pft_gemma3_4b  # pylint: disable=g-import-not-at-top
  c = ft_embeddinggemma_300m.get_config("ckpt=/x/eg,batch=32,pft_steps=3")
  assert c.init_from == "/x/eg" and c.tokenizer == ""
  assert c.stages[0].steps == 3 and c.tasks.code_search.batch_size == 32
  c = pft_gemma3_4b.get_config("ckpt=/x/g4")
  assert c.init_from == "/x/g4" and c.vision_init_from == "/x/g4/vision"
  model = ModelConfig.from_dict(c.model.to_dict())
  from embed2.model.frontends import ViTImageFrontend  # pylint: disable=g-import-not-at-top
  # The ViT frontend is exactly Gemma 3's vision tower, so the converted weights load into it.
  assert ViTImageFrontend.vision_config(model) == VisionConfig(text_dim=2560, dtype=model.dtype)
  with pytest.raises(ValueError, match="unknown config knob"):
    pft_gemma3_4b.get_config("steps=3")


def test_media_fields_override_from_the_command_line():
  """`--config.model.media.FIELD=...` reaches the model's MediaConfig, as embed2.main parses it."""
  argv = ["main", f"--config={CONFIG_DIR / 'demo.py'}", "--config.model.media.image_size=64",
          "--config.model.media.video_fps=0.5", "--config.model.num_layers=3"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "experiment config", flag_values=fv, sys_argv=argv)
  fv(argv)
  model = ModelConfig.from_dict(fv.config.model.to_dict())
  assert model.media.image_size == 64 and model.media.video_fps == 0.5 and model.num_layers == 3
  assert model.media.image_frontend == "patch" and model.media.n_mels == 32  # the rest as configured
