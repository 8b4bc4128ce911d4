"""A whole run with its workdir on an object store: a GCS server on 127.0.0.1 started by the test.

The server is `gcp-storage-emulator` (the JSON API of Cloud Storage, in memory). Every client in the
run is pointed at it, the way one points them at a private endpoint:
- epath (`gs://` through fsspec's gcsfs: metrics parts, eval JSON, soup.json, exports, ...) by
  $STORAGE_EMULATOR_HOST;
- Orbax's arrays (tensorstore's `gcs` kvstore driver) by $TENSORSTORE_GCS_HTTP_URL, with
  $GOOGLE_AUTH_TOKEN_FOR_TESTING as the bearer token (the emulator checks none);
- TensorBoard's event writer (google-cloud-storage) by $STORAGE_EMULATOR_HOST too.

First a "pretrained" model is converted into the bucket: a checkpoint of the run's architecture
(random weights) is exported by `embed2.convert --to_safetensors` to a sentence-transformers folder
there and imported back from it by `embed2.convert --hf_dir=gs://...`. The run (configs/tiny.py, two
stages, a soup variant, the soup) starts from that import (`--config.init_from=gs://...`, whose
tokenizer.json it trains with), is killed mid-stage by the trainer's fault seam and resumed with the same
command; then a suite whose data is in the bucket is evaluated and a corpus exported from the soup, all
reading and writing gs://. Nothing is written on the local disk but temporary folders (the converter's
tokenizer checks) and the JAX compilation cache.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import gcsfs  # noqa: F401  (the gs:// filesystem epath uses without TensorFlow: fail here when missing)
import gcp_storage_emulator  # noqa: F401  (the server)
import jax
import numpy as np
import pytest
from etils import epath
from flax import nnx

from configs import tiny
from embed2 import checkpoint as ckpt_lib
from embed2 import convert
from embed2 import evaluate
from embed2 import export
from embed2.model import EmbeddingModel, ModelConfig
from embed2.train import faults
from embed2.train.metrics_writer import METRICS_DIR, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "embed2-test"
# tests/test_crash_safety.py's run (the same compiled programs through the session's compilation
# cache): one block, PFT ends at step 5, FT at 12, saves every 3 steps; then the variant "alt" and the soup.
ARG = "pft_steps=5,ft_steps=7,every=3,seed=7,layers=1"
KILL_AT = 8  # steps done when the seam kills: the last checkpoint is at 6 (or 5), later steps replay


# The emulator, with one gap filled: Cloud Storage sends an object's generation in the x-goog-generation
# header of a media download, and tensorstore takes its read's generation from there. Without it a read is
# stamped generation 0, and the conditional write that follows it (OCDBT's manifest, the second item of a
# checkpoint) fails "Malformed StorageGeneration". (The emulator also ignores ifGenerationMatch; one
# writer at a time, as here, does not need it.) The route table is built when `server` is imported, so the
# handler is wrapped before.
SERVER = """
import sys
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
  except Exception:  # missing: the handler answers 404
    pass
  return _download(request, response, storage, *args, **kwargs)


objects.download = download
from gcp_storage_emulator import __main__ as emulator
emulator.main(sys.argv[1:])
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  """(environment pointing every client at a fresh emulator, gs:// root of this test's bucket)."""
  port = _free_port()
  # Its request log goes to a file: a pipe nobody reads would fill and stall the server.
  log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "w")
  server = subprocess.Popen(
      [sys.executable, "-c", SERVER, "start", "--host=127.0.0.1", f"--port={port}",
       "--in-memory", f"--default-bucket={BUCKET}"],
      stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  endpoint = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
              "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
              # gcsfs's zonal-bucket probe asks Google's control API for the bucket type (no
              # credentials here: one warning per bucket); the plain GCS client is what runs.
              "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  for _ in range(300):
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      assert server.poll() is None, f"the emulator exited; see {log.name}"
      time.sleep(0.1)
  saved = {k: os.environ.get(k) for k in endpoint}
  os.environ.update(endpoint)  # this process too: the eval and the export run in it
  try:
    yield endpoint, f"gs://{BUCKET}"
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=30)
    log.close()


def _main(workdir, endpoint, init_from, kill_at=""):
  env = dict(os.environ, **endpoint, XLA_FLAGS=f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop(faults.ENV, None)
  if kill_at:
    env[faults.ENV] = kill_at
  cmd = [sys.executable, "-m", "embed2.main", f"--config={REPO}/configs/tiny.py:{ARG},soup",
         f"--workdir={workdir}", "--config.checkpoint.keep=2", f"--config.init_from={init_from}"]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _pure_params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _convert_into_bucket(root, rng):
  """A model of the run's architecture (random weights, small enough to train from) saved in the bucket,
  exported there to a sentence-transformers folder and imported back from it, both by the
  `embed2.convert` command line; checks the files each wrote and that the weights came back bit for bit.
  Returns the import's path."""
  cfg = ModelConfig.from_dict(tiny.get_config(ARG).model.to_dict())
  shapes = _pure_params(nnx.eval_shape(lambda: EmbeddingModel(cfg, rngs=nnx.Rngs(0))))
  params = jax.tree.map(lambda x: (0.02 * rng.standard_normal(x.shape)).astype(np.float32), shapes)
  ck = ckpt_lib.Checkpointer(root / "pretrained" / "ckpt", keep=None, async_save=False)
  ck.save(0, params=params, meta={"model_config": cfg.to_dict(), "tokenizer": ""}, force=True)
  ck.close()
  st, imported = root / "pretrained" / "st", root / "pretrained" / "embed2"
  convert.main(["--to_safetensors", f"--ckpt={root / 'pretrained' / 'ckpt'}", f"--out={st}"])
  files = sorted(str(p.relative_to(st)) for p in st.glob("*") if p.is_file())
  files += sorted(str(p.relative_to(st)) for p in st.glob("*/*"))
  assert files == ["config.json", "config_sentence_transformers.json", "model.safetensors", "modules.json",
                   "sentence_bert_config.json", "tokenizer.json", "tokenizer_config.json",
                   "1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors"], files
  assert json.loads((st / "modules.json").read_text())[-1]["type"].endswith("Normalize")
  res = convert.main([f"--hf_dir={st}", f"--out={imported}"])
  assert sorted(p.name for p in imported.iterdir()) == ["0", "tokenizer.json", "tokenizer_config.json"]
  assert res["tokenizer"] == str(imported / "tokenizer.json") and res["source"]["hf_dir"] == str(st)
  back, meta = ckpt_lib.load_model(imported)
  assert meta["source"]["format"] == "sentence-transformers"
  jax.tree.map(np.testing.assert_array_equal, _pure_params(back), params)
  return imported


def _beir(folder, rng, n=8):
  """A tiny BEIR-layout retrieval task in `folder` (an epath)."""
  words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "lambda", "zeta"]
  docs = [" ".join(rng.choice(words, size=6)) for _ in range(n)]
  folder.mkdir(parents=True)
  (folder / "corpus.jsonl").write_text("".join(
      json.dumps({"_id": f"d{i}", "title": "", "text": d}) + "\n" for i, d in enumerate(docs)))
  (folder / "queries.jsonl").write_text("".join(
      json.dumps({"_id": f"q{i}", "text": d}) + "\n" for i, d in enumerate(docs)))
  (folder / "qrels").mkdir()
  (folder / "qrels" / "test.tsv").write_text(
      "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(n)))
  return docs


def test_convert_then_run_kill_resume_eval_soup_export_on_gcs(store, rng):
  endpoint, root = store
  workdir = epath.Path(root) / "run"
  init = _convert_into_bucket(epath.Path(root), rng)

  killed = _main(workdir, endpoint, init, kill_at=f"kill@{KILL_AT}")
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert f"initialised from {init}" in killed.stderr, killed.stderr[-3000:]
  ck = ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True)
  # Step 6's save is asynchronous: the kill at 8 may come before it commits, and then the stage end (5)
  # is the last finished checkpoint. Either way the resume replays the steps after it.
  latest = ck.latest_step()
  assert latest in (5, 6), latest
  ck.close()
  replayed = list(range(latest + 1, KILL_AT + 1))
  before = [r["step"] for r in read_metrics(workdir) if "loss" in r]  # lists the metric parts here
  assert before == list(range(1, KILL_AT + 1)), before
  done = _main(workdir, endpoint, init)
  assert done.returncode == 0, done.stderr[-3000:]
  # The reader lists the parts afresh, though this process listed them before the resume wrote more.
  rows = [r for r in read_metrics(workdir) if "loss" in r]
  assert [r["step"] for r in rows] == list(range(1, 13))
  # Orbax's step listing is not: gcsfs keeps listings (no expiry).
  epath.backend.fsspec_backend.fs(root).invalidate_cache()

  # What the run left on the store.
  ck = ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True)
  assert ck.all_steps() == [9, 12] and ck.read_meta(12)["stage_name"] == "ft"
  ck.close()
  for rel in ("stages/pft", "stages/ft", "variants/alt/checkpoints", "variants/alt/stages/ft", "soup"):
    _, step, meta = ckpt_lib.read_checkpoint(workdir / rel)
    # The run trained with the import's own tokenizer, read from the bucket (a soup carries a copy).
    own = workdir / "soup" / "tokenizer.json" if rel == "soup" else init / "tokenizer.json"
    assert meta["tokenizer"] == str(own), (rel, meta.get("tokenizer"))
  assert (workdir / "soup" / "tokenizer.json").read_bytes() == (init / "tokenizer.json").read_bytes()
  soup = json.loads((workdir / "soup" / "soup.json").read_text())
  assert soup["method"] == "uniform" and len(soup["ingredients"]) == 2
  assert list((workdir / "tensorboard").iterdir()), "no TensorBoard events"
  assert not (workdir / "metrics.jsonl").exists()

  # Metrics: the parts, written whole, hold the replayed steps twice (before the kill and again); the
  # reader gives every step of the run once, the replay's line winning.
  parts = sorted((workdir / METRICS_DIR).iterdir())
  assert {p.name.split("-")[1] for p in parts} == {"00000", "00001"}  # two sessions: kill, resume
  raw = [json.loads(x) for p in parts for x in p.read_text().splitlines()]
  raw_steps = [r["step"] for r in raw if "loss" in r]
  assert sorted(raw_steps) == sorted(list(range(1, 13)) + replayed)
  assert [r["stage"] for r in rows] == ["pft"] * 5 + ["ft"] * 7
  resumed = {r["step"]: r for p in parts if p.name.split("-")[1] == "00001"
             for r in map(json.loads, p.read_text().splitlines()) if "loss" in r}  # session 1's lines
  for r in rows:
    if r["step"] in replayed:
      assert r == resumed[r["step"]]
  variant = [r["step"] for r in read_metrics(workdir / "variants" / "alt") if "loss" in r]
  assert variant == list(range(1, 8))

  # Eval of the soup, its JSON on the store; the data too.
  data = epath.Path(root) / "data"
  _beir(data / "mteb_retrieval" / "Tiny", rng)
  out = workdir / "eval" / "soup_mteb.json"
  doc = evaluate.main([f"--checkpoint={workdir / 'soup'}", "--suite=mteb_retrieval", f"--data_dir={data}",
                       f"--out={out}", "--no_bm25", "--batch_size=8"])
  saved = json.loads(out.read_text())
  assert saved["metrics"] == doc["metrics"] and saved["step"] == 0
  assert any(k.startswith("Tiny/ndcg@10") for k in saved["metrics"])

  # Export of a corpus that lives on the store, to the store.
  texts = [f"{w} {i}" for i, w in enumerate(rng.choice(["def f(x):", "import os", "class A:"], size=11))]
  corpus = workdir / "corpus.jsonl"
  corpus.write_text("".join(json.dumps({"id": f"c{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
  res = export.main([f"--checkpoint={workdir / 'soup'}", f"--input={corpus}",
                     f"--output={workdir / 'export' / 'corpus'}", "--batch_size=8"])
  assert res["count"] == len(texts) and res["npy"] == str(workdir / "export" / "corpus.npy")
  with (workdir / "export" / "corpus.npy").open("rb") as f:
    e_nd = np.load(f)
  assert e_nd.shape == (len(texts), res["dim"]) and np.all(np.isfinite(e_nd))
  np.testing.assert_allclose(np.linalg.norm(e_nd, axis=1), 1.0, rtol=1e-5)
  pq = pytest.importorskip("pyarrow.parquet")  # the .parquet is written when pyarrow is installed
  with (workdir / "export" / "corpus.parquet").open("rb") as f:
    table = pq.read_table(f)
  assert table.column("id").to_pylist() == [f"c{i}" for i in range(len(texts))]
  np.testing.assert_array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), e_nd)
