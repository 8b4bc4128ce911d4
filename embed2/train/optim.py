"""Per-stage optimizer: AdamW with linear warmup and cosine (or linear) decay, gradient clipping, and
freezing of parameters whose path matches a pattern.

Parameter paths are '/'-joined keys of the model's parameter tree, e.g.
`transformer/blocks/3/attn/q` or `head/0`. A stage's `freeze` is a list of regular expressions searched
in those paths (`"transformer/embedder"`, `"transformer/blocks/[0-5]/"`); frozen parameters get no
update at all (not even weight decay). A pattern that matches nothing is an error: a typo would
otherwise silently train everything.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import optax


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
  learning_rate: float = 1e-3
  warmup_steps: int = 0
  decay: str = "cosine"  # cosine | linear | constant
  final_lr_ratio: float = 0.1  # the learning rate at the last step, relative to the peak
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: float | None = 1.0  # global-norm clipping; None = off
  freeze: tuple[str, ...] = ()

  def validate(self, where: str) -> None:
    if self.learning_rate <= 0:
      raise ValueError(f"{where}.learning_rate={self.learning_rate} must be > 0")
    if self.warmup_steps < 0:
      raise ValueError(f"{where}.warmup_steps={self.warmup_steps} must be >= 0")
    if self.decay not in ("cosine", "linear", "constant"):
      raise ValueError(f"{where}.decay={self.decay!r}; choose cosine, linear or constant")
    if not 0 <= self.final_lr_ratio <= 1:
      raise ValueError(f"{where}.final_lr_ratio={self.final_lr_ratio} must be in [0, 1]")
    if self.grad_clip is not None and self.grad_clip <= 0:
      raise ValueError(f"{where}.grad_clip={self.grad_clip} must be > 0 or None")
    for p in self.freeze:
      try:
        re.compile(p)
      except re.error as e:
        raise ValueError(f"{where}.freeze pattern {p!r} is not a valid regular expression: {e}") from None


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Warmup from 0 to the peak over `warmup_steps`, then decay to `final_lr_ratio * peak` at the end."""
  peak = cfg.learning_rate
  warm = min(cfg.warmup_steps, max(total_steps - 1, 0))
  rest = max(total_steps - warm, 1)
  if cfg.decay == "constant":
    after = optax.constant_schedule(peak)
  elif cfg.decay == "linear":
    after = optax.linear_schedule(peak, peak * cfg.final_lr_ratio, rest)
  else:
    after = optax.cosine_decay_schedule(peak, rest, alpha=cfg.final_lr_ratio)
  if warm == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def path_str(path: Sequence[Any]) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def param_labels(params: Any, freeze: Sequence[str], where: str = "stage") -> Any:
  """'frozen' or 'train' per leaf of `params`; refuses patterns that match no parameter."""
  patterns = [re.compile(p) for p in freeze]
  hits = [0] * len(patterns)

  def label(path, _):
    s = path_str(path)
    frozen = False
    for i, p in enumerate(patterns):
      if p.search(s):
        hits[i] += 1
        frozen = True
    return "frozen" if frozen else "train"

  labels = jax.tree_util.tree_map_with_path(label, params)
  for p, n in zip(freeze, hits):
    if n == 0:
      names = [path_str(pth) for pth, _ in jax.tree_util.tree_flatten_with_path(params)[0]][:8]
      raise ValueError(f"{where}.freeze pattern {p!r} matches no parameter; paths look like {names}")
  return labels


def make_optimizer(cfg: OptimConfig, total_steps: int, params: Any,
                   where: str = "stage") -> optax.GradientTransformation:
  """AdamW (+ clipping, + freezing) for one stage of `total_steps` steps over `params`' structure."""
  cfg.validate(where)
  # Weight decay on matrices only: norm scales and scalars (temperature) are left alone.
  # (Callables, so that they see the exact tree the optimizer is given, whatever its container types.)
  decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
  parts = []
  if cfg.grad_clip is not None:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  tx = optax.chain(*parts)
  if not cfg.freeze:
    return tx
  param_labels(params, cfg.freeze, where)  # refuse patterns that match nothing, now
  labels = lambda p: param_labels(p, cfg.freeze, where)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
