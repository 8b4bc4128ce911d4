"""Test set-up, before jax is imported anywhere (subprocesses inherit the environment):

- 8 simulated CPU devices;
- a persistent compilation cache, fresh for each test session: many tests compile the same small
  programs (the tiny config's train steps, in-process and in subprocesses), and compiling dominates
  their run time on a 2-core machine. The first compile of each program in a session is real;
- $JAX_DISABLE_MOST_OPTIMIZATIONS=1 (JAX's knob for programs that run less than they take to
  optimise): XLA's backend (LLVM) works at -O0, which about halves a compile of the tiny train step and
  doubles its few milliseconds of run time. With it, on jaxlib 0.10 (where the flag is known: XLA
  refuses to start on a flag it does not know), XLA_FLAGS gets --xla_cpu_use_fusion_emitters=false:
  XLA's CPU backend emits its fusions with its older LLVM emitters instead of the MLIR fusion
  emitters, whose pipeline costs more to compile than these programs take to run (in-process modules
  take 28-40% less CPU, e.g. test_losses 38 -> 23 s, test_model 42 -> 31 s; a cold tiny run 42 -> 35 s).
  The HLO passes (fusion, sharding) are the ones users get; float results may differ from an
  optimised build in the last bit, and every test compares runs of one build (a subprocess keeps the
  session's XLA_FLAGS, appending its device count: the last one wins), or to a tolerance. Set it to 0
  to run the suite on optimised programs with XLA's own emitters;
- the slowest modules first (`SLOW_FIRST`): with `pytest -n 2` (and --dist=loadfile, set here, so a
  module's shared runs are made once) each worker takes the next module when it is free, and the small
  ones even out the end;
- seeded random inputs: the `rng` fixture (one numpy Generator per test) and `fixture_rng` (for
  module- or session-scoped fixtures), seeded from a stable hash of the test's node id (or the
  fixture's name) and $EMBED2_TEST_SEED. A test draws the same numbers on every run, alone or in
  the suite, in any order; a failing test's report lists its seeds. To explore other draws, set
  EMBED2_TEST_SEED to any string (e.g. `EMBED2_TEST_SEED=7 pytest tests/test_x.py`); to replay a
  failure, run the same test with the same EMBED2_TEST_SEED. tests/test_tests_seeded.py keeps
  unseeded generators out of the tests.
"""
import hashlib
import importlib.metadata
import os
import tempfile

import numpy as np
import pytest

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="embed2_test_jax_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
if (os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() not in ("0", "false", "f", "no", "n", "off")
    and importlib.metadata.version("jaxlib").startswith("0.10.")
    and "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]):
  os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"

# The modules over ~20 s of CPU, slowest first (user+sys seconds, one module at a time on the 2-core
# machine, pytest's start-up included; measured while other work kept the load at 3-4.5):
# 98, 91, 84, 54, 51, 47, 37, 33, 29, 29, 28, 28, 26, 24, 23. The others follow in file order.
SLOW_FIRST = ("test_multihost.py", "test_crash_safety.py", "test_train.py", "test_bench_vs_peers.py",
              "test_object_store.py", "test_bert.py", "test_convert.py", "test_grad_cache.py",
              "test_notebook.py", "test_model.py", "test_media_tasks.py", "test_soup.py",
              "test_multimodal.py", "test_evaluate_cli.py", "test_losses.py")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
  """With -n (pytest-xdist) and no --dist / --loadscope-reorder of the caller's: --dist=loadfile, a
  worker takes a whole module (its shared runs are made once), and the modules are handed out in
  collection order (`pytest_collection_modifyitems`), not sorted by their number of tests."""
  given = " ".join(map(str, config.invocation_params.args))
  if getattr(config.option, "numprocesses", None) and "--dist" not in given:
    config.option.dist = "loadfile"
    if hasattr(config.option, "loadscopereorder") and "loadscope-reorder" not in given:
      config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  """The modules of `SLOW_FIRST` first, in its order; the others after them in file order."""
  del config
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order


SEED_ENV = "EMBED2_TEST_SEED"
_SEEDS = pytest.StashKey[dict]()


def stable_seed(name: str) -> int:
  """A 64-bit seed from `name` and $EMBED2_TEST_SEED (unset: ""), the same on every run and machine
  (blake2b; Python's built-in str hash changes with each process)."""
  salt = os.environ.get(SEED_ENV, "")
  return int.from_bytes(hashlib.blake2b(f"{name}|{salt}".encode(), digest_size=8).digest(), "little")


def _generator(node: pytest.Item | pytest.Collector, label: str, name: str) -> np.random.Generator:
  seed = stable_seed(name)
  node.stash.setdefault(_SEEDS, {})[label] = seed
  return np.random.default_rng(seed)


@pytest.fixture
def rng(request) -> np.random.Generator:
  """This test's numpy Generator, seeded from its node id (parametrized cases differ)."""
  return _generator(request.node, "rng", request.node.nodeid)


@pytest.fixture(scope="session")
def fixture_rng():
  """fixture_rng(request) -> a Generator for a fixture wider than one test, seeded from the
  fixture's name and its scope's node id: each fixture its own stream, whichever test builds it."""

  def make(request) -> np.random.Generator:
    name = f"{request.node.nodeid}::{request.fixturename}"
    return _generator(request.node, f"fixture {request.fixturename}", name)

  return make


@pytest.fixture(scope="session")
def random_tiny_model():
  """random_tiny_model(rng) -> an EmbeddingModel of the tiny preset on the shipped tokenizer's vocab
  (8192), every parameter (norm scales too) drawn from N(0, 0.3) by the numpy Generator `rng`.

  Built abstractly and filled from numpy: an eager nnx init compiles op by op (seconds).
  """
  # Imported here, not above: jax must start after the environment set at the top of this file, and
  # only the tests that build a model need it.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from embed2.model import EmbeddingModel, ModelConfig  # pylint: disable=g-import-not-at-top

  def make(rng: np.random.Generator):
    cfg = ModelConfig.from_name("tiny", vocab_size=8192)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: EmbeddingModel(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, jax.tree.map(
        lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape).astype(x.dtype)), state))

  return make


@pytest.fixture(scope="session")
def save_random_checkpoint(random_tiny_model):
  """save_random_checkpoint(directory, rng, *, step, task_strings) -> the model it saved: a
  `random_tiny_model(rng)` written as the embed2 checkpoint DIRECTORY/STEP (params and a meta naming
  the package tokenizer and `task_strings`)."""
  # Imported here for random_tiny_model's reason.
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from embed2.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top

  def save(directory, rng: np.random.Generator, *, step: int, task_strings: dict[str, str]):
    model = random_tiny_model(rng)
    ck = Checkpointer(directory)
    ck.save(step, params=nnx.to_pure_dict(nnx.state(model, nnx.Param)), force=True,
            meta={"model_config": model.cfg.to_dict(), "tokenizer": "",
                  "task_strings": dict(task_strings)})
    ck.wait()
    return model

  return save


@pytest.fixture(scope="session")
def saved_item():
  """saved_item(path) -> the Orbax checkpoint item at PATH (e.g. WORKDIR/checkpoints/12/params) as a
  pytree of numpy arrays, read as saved: no model is built, and any device count reads it (list indices
  come back as string keys)."""
  # Imported here for random_tiny_model's reason.
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  def read(path):
    ck = ocp.PyTreeCheckpointer()
    tree = getattr(ck.metadata(path), "item_metadata", None) or ck.metadata(path)
    tree = getattr(tree, "tree", tree)
    return ck.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))

  return read


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
  """Adds the seeds a failed test drew from (its own and its fixtures') to its report."""
  report = yield
  if report.failed:
    seeds = {}
    for node in item.listchain():
      seeds.update(node.stash.get(_SEEDS, {}))
    if seeds:
      salt = os.environ.get(SEED_ENV)
      shown = "unset" if salt is None else repr(salt)
      lines = [f"{label}: seed {seed}" for label, seed in seeds.items()]
      lines.append(f"(from the node id / fixture name and {SEED_ENV}={shown}; rerun the same test "
                   f"with the same {SEED_ENV} to replay these draws, set it to another value to "
                   "explore others)")
      report.sections.append(("random seeds", "\n".join(lines)))
  return report
