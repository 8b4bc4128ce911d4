"""The device mesh and the logical-axis rules that place parameters and activations on it.

Every parameter carries logical axis names in its metadata (`logical_axes=("embed", "mlp")`); one short
rules table, owned by the config, maps each logical name to mesh axes. The batch is sharded over
(`data`, `fsdp`); `fsdp` also shards the parameters' `embed` dimension; `tensor` shards heads, mlp and
vocab (Megatron style: activations keep the model dim whole between blocks).

A dimension whose size is not divisible by its mesh axes is replicated instead (Gemma's single kv head
cannot be split over tensor=2); `param_shardings` reports each such fallback so it is never a surprise.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (logical name, mesh axes). Parameters: vocab/embed/heads/kv_heads/head_dim/mlp/proj/norm.
# Activations: act_batch/act_len/act_embed/act_heads/act_mlp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("proj", "tensor"),
    ("norm", None),
)


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor) from `{"data": -1, "fsdp": 1, "tensor": 1}`.

  One size may be -1: it takes whatever the others leave of the device count. Axis types are Auto
  (sharding propagated by the compiler from parameter shardings and constraints).
  """
  shape = dict(shape or {"data": -1})
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {unknown}; the mesh axes are {MESH_AXES}")
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f"config.mesh={shape}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh={shape}: sizes must be positive or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n % known:
      raise ValueError(f"config.mesh={shape}: the fixed axes multiply to {known}, which does not divide "
                       f"the {n} devices; change the fixed sizes")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise ValueError(f"config.mesh={shape}: the product of mesh axes is {math.prod(sizes)} but there are "
                     f"{n} devices; make the sizes multiply to {n} or set one axis to -1")
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)


def _rules_dict(rules: Iterable[tuple[str, Any]]) -> dict[str, tuple[str, ...]]:
  out = {}
  for name, axes in rules:
    if axes is None:
      out[name] = ()
    elif isinstance(axes, str):
      out[name] = (axes,)
    else:
      out[name] = tuple(axes)
  return out


def logical_to_spec(logical_axes: Sequence[str | None], rules, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> P:
  """PartitionSpec for logical axis names.

  With `mesh` and `shape`, a dimension not divisible by its mesh axes' size is replicated, and mesh axes
  already used by an earlier dimension are not reused (a mesh axis can shard one dimension only).
  """
  table = _rules_dict(rules)
  spec, used = [], set()
  for i, name in enumerate(logical_axes):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ValueError(f"logical axis {name!r} has no rule; add it to config.sharding_rules "
                       f"(known: {sorted(table)})")
    axes = tuple(a for a in table[name] if a not in used)
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
      if shape is not None and axes:
        size = math.prod(mesh.shape[a] for a in axes)
        if shape[i] % size:
          axes = ()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def param_specs(state: nnx.State, mesh: Mesh, rules) -> tuple[Any, list[str]]:
  """PartitionSpec per parameter from its `logical_axes` metadata, and the list of replication fallbacks."""
  fallbacks = []

  def one(path, var):
    names = var.get_metadata().get("logical_axes")
    shape = var.get_value().shape
    if names is None:
      return P()
    if len(names) != len(shape):
      raise ValueError(f"parameter {jax.tree_util.keystr(path)} has logical axes {names} but shape {shape}")
    spec = logical_to_spec(names, rules, mesh, shape)
    wanted = logical_to_spec(names, rules, mesh)
    if spec != wanted:
      fallbacks.append(f"{jax.tree_util.keystr(path)} {shape}: wanted {wanted}, replicated to {spec}")
    return spec

  specs = jax.tree.map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return specs, fallbacks


def param_shardings(state: nnx.State, mesh: Mesh, rules) -> Any:
  specs, fallbacks = param_specs(state, mesh, rules)
  for f in fallbacks:
    logging.info("sharding fallback: %s", f)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def abstract_sharded(factory, mesh: Mesh, rules):
  """`factory()` (an nnx.Module) traced abstractly: no memory, every leaf a jax.ShapeDtypeStruct that
  carries the sharding the rules give it on `mesh`. A checkpoint restore fills it in shard by shard
  (`embed2.checkpoint.load_model`), so nothing is initialised only to be overwritten."""
  graphdef, abs_state = nnx.split(nnx.eval_shape(factory))
  shardings = param_shardings(abs_state, mesh, rules)
  abs_state = jax.tree.map(
      lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), abs_state,
      shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, abs_state)


def create_sharded(factory, mesh: Mesh, rules):
  """Builds `factory()` (an nnx.Module) with every parameter created already sharded on `mesh`.

  The module is first traced abstractly (no memory), its shardings derived from the rules, then its
  initialiser is compiled with those output shardings, so no device ever holds a whole parameter.
  """
  abstract = nnx.eval_shape(factory)
  graphdef, abs_state = nnx.split(abstract)
  shardings = param_shardings(abs_state, mesh, rules)

  def init():
    return nnx.split(factory())[1]

  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op outside a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or rules is None:
    return x
  table = _rules_dict(rules)
  spec, used = [], set()
  for i, name in enumerate(logical_axes):
    axes = tuple(a for a in table.get(name, ()) if a not in used and a in mesh.axis_names
                 and mesh.shape[a] > 1) if name else ()
    if axes and x.shape[i] % math.prod(mesh.shape[a] for a in axes):
      axes = ()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return jax.lax.with_sharding_constraint(x, P(*spec))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading dimension over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def num_batch_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
