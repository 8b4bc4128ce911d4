"""Blocks shared by the experiment configs.

Configs are ml_collections ConfigDicts built by `get_config(arg)` in one file per experiment; `arg` is a
comma-separated list of short knobs (`tiny.py:layers=4,dim=128`), parsed by `parse_arg`.
"""

from __future__ import annotations

from ml_collections import config_dict

from embed2 import sharding


def parse_arg(arg: str | None, **defaults):
  """`"a=1,b=x,flag"` -> ConfigDict(a=1, b="x", flag=True) over `defaults` (values typed like them)."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config knob {key!r}; known knobs: {sorted(defaults)}")
    if not eq:
      out[key] = True
      continue
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ("1", "true", "yes")
    elif defaults[key] is None:
      out[key] = value
    else:
      out[key] = kind(value)
  return config_dict.ConfigDict(out)


def model(preset: str, **overrides) -> config_dict.ConfigDict:
  """`config.model`: a preset name plus field overrides (see embed2.model.presets.ModelConfig)."""
  return config_dict.ConfigDict(dict(preset=preset, **overrides))


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> config_dict.ConfigDict:
  """`config.mesh`: sizes of the (data, fsdp, tensor) axes; one may be -1 (fills the device count)."""
  return config_dict.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def sharding_rules():
  """`config.sharding_rules`: logical axis -> mesh axes. Short on purpose; edit per experiment."""
  return tuple(sharding.DEFAULT_RULES)
