"""embed2.bench.xla_profile: the HLO classes (matmul or not; forward / backward / update) of the ops of
a real compiled train step, and a live profiler trace mapped onto them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from embed2.bench import xla_profile as xp


def _step_and_inputs(rng):
  """A tiny MLP's SGD step (value_and_grad + an update outside it), and its inputs."""
  w1 = jnp.asarray(rng.standard_normal((32, 64)), jnp.float32)
  w2 = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)

  def loss(params, x):
    h = jnp.tanh(x @ params[0])
    return jnp.mean((h @ params[1]) ** 2)

  @jax.jit
  def step(params, x):
    value, grads = jax.value_and_grad(loss)(params, x)
    norm = optax.tree.norm(grads)
    return [p - 0.1 * g / (1.0 + norm) for p, g in zip(params, grads)], value

  return step, [w1, w2], x


def test_parse_hlo_classes_the_ops_of_a_train_step(rng):
  step, params, x = _step_and_inputs(rng)
  info = xp.parse_hlo(step.lower(params, x).compile().as_text())
  phases = {(i.phase, i.matmul) for i in info.values()}
  # Forward matmuls (x @ w1, h @ w2), backward matmuls (their transposes), and the update's
  # elementwise ops (p - 0.1 g / (1 + norm)) outside the differentiated function.
  assert {("forward", True), ("backward", True), ("update", False)} <= phases, phases
  assert not any(i.matmul for i in info.values() if i.phase == "update")


def test_parse_hlo_of_a_program_without_grad_is_all_forward(rng):
  a = jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)
  text = jax.jit(lambda a: jnp.exp(a @ a) + 1.0).lower(a).compile().as_text()
  info = xp.parse_hlo(text)
  assert {i.phase for i in info.values()} == {"forward"}
  assert any(i.matmul for i in info.values()) and not all(i.matmul for i in info.values())


def test_trace_ops_maps_onto_the_dumped_hlo(tmp_path, rng):
  """A profiled call's ops are all found in the program's HLO, and the breakdown adds up."""
  step, params, x = _step_and_inputs(rng)
  compiled = step.lower(params, x).compile()
  dump = tmp_path / "dump"
  dump.mkdir()
  (dump / "module_0001.jit_step.cpu_after_optimizations.txt").write_text(compiled.as_text())
  hlo = xp.read_hlo_dumps(str(dump))
  assert hlo and {m for m, _ in hlo} == {"jit_step"}

  def call():
    jax.block_until_ready(compiled(params, x))

  call()
  ops = xp.trace_ops(call, 2, str(tmp_path / "trace"))
  assert ops and all(us >= 0 for us in ops.values())
  assert set(ops) <= set(hlo), set(ops) - set(hlo)
  out = xp.breakdown(ops, hlo)
  assert out["unclassified_seconds"] == 0
  cells = sum(v for k, v in out.items() if k.endswith(("_matmul", "_other")))
  np.testing.assert_allclose(cells, out["op_seconds"], rtol=1e-9)
  np.testing.assert_allclose(cells, sum(ops.values()) / 1e6, rtol=1e-9)
  assert 0 < out["matmul_share"] < 1


def test_breakdown_counts_unknown_ops_apart():
  hlo = {("m", "dot.1"): xp.OpInfo(True, "forward"), ("m", "add.2"): xp.OpInfo(False, "update")}
  out = xp.breakdown({("m", "dot.1"): 3e6, ("m", "add.2"): 1e6, ("other", "x"): 2e6}, hlo)
  assert out["forward_matmul"] == 3.0 and out["update_other"] == 1.0
  assert out["unclassified_seconds"] == 2.0 and out["op_seconds"] == 6.0
  assert out["matmul_share"] == 0.5
  assert out["slowest_other_ops"] == [["add.2", 1.0]]


def test_same_named_modules_that_disagree_leave_the_op_unclassified(tmp_path):
  """Two modules of one name (one jitted function at two shapes) in which the op `x.1` is a dot in one
  and an add in the other: it is None (its time unclassified); `y.2`, an add in both, keeps its class."""
  def module(x_op):
    return ("HloModule jit_f, entry_computation_layout={(f32[2,2]{1,0})->f32[2,2]{1,0}}\n\n"
            "ENTRY %main.3 (p: f32[2,2]) -> f32[2,2] {\n"
            "  %p = f32[2,2]{1,0} parameter(0)\n"
            f"  %x.1 = f32[2,2]{{1,0}} {x_op}(%p, %p), metadata={{op_name=\"jit(f)/x\"}}\n"
            "  ROOT %y.2 = f32[2,2]{1,0} add(%x.1, %p), metadata={op_name=\"jit(f)/add\"}\n}\n")

  (tmp_path / "module_0000.jit_f.cpu_after_optimizations.txt").write_text(module("dot"))
  (tmp_path / "module_0001.jit_f.cpu_after_optimizations.txt").write_text(module("add"))
  assert xp.parse_hlo(module("dot"))["x.1"] == xp.OpInfo(True, "forward")
  hlo = xp.read_hlo_dumps(str(tmp_path))
  assert hlo[("jit_f", "x.1")] is None
  assert hlo[("jit_f", "y.2")] == xp.OpInfo(False, "forward")
  out = xp.breakdown({("jit_f", "x.1"): 5e5, ("jit_f", "y.2"): 2.5e5}, hlo)
  assert out["unclassified_seconds"] == 0.5 and out["forward_other"] == 0.25
  assert out["op_seconds"] == 0.75
