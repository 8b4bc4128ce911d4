"""Hugging Face folders: reading a transformers / sentence-transformers folder (config, tensors,
tokenizer, prompts), writing the tokenizer files of a converted or exported folder, and the output
directory every conversion builds aside and renames into place.

Folders may be local or on an object store (`gs://`, `s3://`): every file goes through etils.epath. An
object store has no rename: there the output is written in place, its completion marker last (see
`tmp_dir`). transformers reads tokenizers from a local folder only: the few tokenizer files of a remote
folder are copied into a temporary local one for it (`local_folder`).

The tokenizer. An import carries the source's own tokenizer, or is refused (a folder without one,
or one embed2 cannot reproduce). A tokenizer.json (what current transformers / sentence-transformers
save), and any tokenizer of a sentence-transformers folder, is loaded with transformers'
AutoTokenizer as sentence-transformers would load it; the resolved `tokenizers` file is written to
OUT/tokenizer.json and embed2's `HFTokenizer` must give AutoTokenizer's ids on probe texts and the
prompts (this needs transformers at import time; embedding needs only `tokenizers`). A transformers
folder with only a sentencepiece tokenizer.model keeps it (`SentencePieceTokenizer`: embed2's
[bos] ... [eos] framing and modality tokens, as training on it uses).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile
import uuid
from typing import Any, Iterator, Sequence

from absl import logging
from etils import epath

from embed2.checkpoint import is_remote
from embed2.convert import layout
from embed2.convert.hf_config import UnsupportedArchitecture, model_config_from_hf, vision_config_from_hf
from embed2.convert.layout import Entry
from embed2.convert.safetensors_io import TensorInfo, read_headers, safetensors_files
from embed2.data import tokenizer as tok_lib
from embed2.model import ModelConfig
from embed2.model.vision import VisionConfig

DTYPES = ("float32", "bfloat16")  # what a converted folder stores its parameters in
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json")
_IDENTITY_ACTIVATIONS = ("torch.nn.modules.linear.Identity", "torch.nn.Identity")


# ================================================================================ reading a source


@dataclasses.dataclass
class Source:
  """Everything known about a Hugging Face checkpoint before a byte of it is converted."""
  hf_dir: epath.Path
  format: str  # "transformers" | "sentence-transformers"
  hf_config: dict[str, Any]
  model_config: ModelConfig
  vision_config: VisionConfig | None
  text: list[Entry]  # transformer + dense head
  vision: list[Entry]
  tensors: dict[str, TensorInfo]
  ignored: list[str]
  tokenizer: "SourceTokenizer"
  prompts: dict[str, str]
  default_prompt_name: str | None = None
  max_seq_length: int | None = None  # sentence-transformers folders: what it truncates inputs at


@dataclasses.dataclass
class SourceTokenizer:
  """The source's tokenizer, read and checked before anything is written.

  kind "tokenizers": `json` is the tokenizer.json as transformers resolves the folder (its
  tokenizer class may rebuild parts of the file), `config` the tokenizer_config.json to write beside
  it; kind "sentencepiece": a tokenizer.model, used by `SentencePieceTokenizer` (embed2's framing and
  modality tokens). `folder`'s other tokenizer files are copied verbatim.
  """
  kind: str
  folder: epath.Path
  json: str | None = None
  config: dict[str, Any] | None = None
  model_max_length: int | None = None

  @property
  def file_name(self) -> str:
    return "tokenizer.json" if self.kind == "tokenizers" else "tokenizer.model"


def _read_json(path: epath.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} is missing") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e})") from None


def _sentence_transformers_modules(hf_dir: epath.Path) -> tuple[epath.Path, list[str], list[int], dict[str, str]]:
  """(backbone dir, Dense folders, their out dims, prompts) of a sentence-transformers folder."""
  modules = sorted(_read_json(hf_dir / "modules.json"), key=lambda m: int(m.get("idx", 0)))
  kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
  if not kinds or kinds[0] != "Transformer":
    raise UnsupportedArchitecture(f"sentence-transformers modules {kinds}; the first must be a Transformer")
  backbone = hf_dir / modules[0].get("path", "")
  dense_dirs, dims, seen_pool = [], [], False
  for m, kind in zip(modules[1:], kinds[1:]):
    folder = hf_dir / m.get("path", "")
    if kind == "Pooling":
      if seen_pool or dense_dirs:
        raise UnsupportedArchitecture(f"sentence-transformers modules {kinds}; expected Transformer, Pooling, "
                                      "Dense..., Normalize")
      _check_pooling(_read_json(folder / "config.json"), folder)
      seen_pool = True
    elif kind == "Dense":
      if not seen_pool:
        raise UnsupportedArchitecture(f"sentence-transformers modules {kinds}: a Dense before Pooling")
      cfg = _read_json(folder / "config.json")
      act = cfg.get("activation_function")
      if cfg.get("bias", True) or act not in _IDENTITY_ACTIVATIONS or cfg.get("use_residual"):
        raise UnsupportedArchitecture(
            f"{folder.name}: Dense with bias={cfg.get('bias', True)}, activation_function={act!r}, "
            f"use_residual={cfg.get('use_residual', False)}; embed2's head is bias-free linear maps "
            "(bias=false, torch.nn.modules.linear.Identity)")
      dense_dirs.append(m.get("path", ""))
      dims.append(int(cfg["out_features"]))
    elif kind == "Normalize":
      pass  # embed2 always L2-normalises
    else:
      raise UnsupportedArchitecture(f"sentence-transformers module {m.get('type')!r} ({folder.name}); embed2 "
                                    "reads Transformer, Pooling (mean), Dense (no bias, identity), Normalize")
  if not seen_pool:
    raise UnsupportedArchitecture(f"sentence-transformers modules {kinds} have no Pooling; embed2 mean-pools")
  prompts = {}
  st_cfg = hf_dir / "config_sentence_transformers.json"
  if st_cfg.exists():
    prompts = {str(k): str(v) for k, v in (_read_json(st_cfg).get("prompts") or {}).items()}
  return backbone, dense_dirs, dims, prompts


def _default_prompt_name(hf_dir: epath.Path, prompts: dict[str, str]) -> str | None:
  st_cfg = hf_dir / "config_sentence_transformers.json"
  name = _read_json(st_cfg).get("default_prompt_name") if st_cfg.exists() else None
  if name is not None and name not in prompts:
    raise ValueError(f"{st_cfg}: default_prompt_name={name!r} is not one of its prompts {sorted(prompts)} "
                     "(sentence-transformers refuses it too)")
  return name


def _sentence_bert_max_length(model_dir: epath.Path, cfg: ModelConfig, model_max_length: int | None) -> int:
  """The length sentence-transformers (6.x) truncates inputs at: sentence_bert_config.json's
  max_seq_length when set, else the tokenizer's model_max_length capped at max_position_embeddings;
  refuses the settings that change tokenization in ways embed2 does not reproduce."""
  path = model_dir / "sentence_bert_config.json"
  sbert = _read_json(path) if path.exists() else {}
  problems = []
  if sbert.get("do_lower_case"):
    problems.append("do_lower_case=true (inputs lowercased)")
  if sbert.get("transformer_task", "feature-extraction") != "feature-extraction":
    problems.append(f"transformer_task={sbert['transformer_task']!r}")
  if sbert.get("processing_kwargs"):
    problems.append(f"processing_kwargs={sbert['processing_kwargs']}")
  for key in ("query_length", "document_length", "query_expansion"):
    if sbert.get(key) is not None:
      problems.append(f"{key}={sbert[key]} (a per-side length)")
  if problems:
    raise UnsupportedArchitecture(f"{path}: {'; '.join(problems)}; embed2 tokenizes both sides the same "
                                  "way, cut at one max_seq_length")
  if sbert.get("max_seq_length") is not None:
    length = int(sbert["max_seq_length"])
  else:
    length = min(model_max_length or cfg.max_length, cfg.max_length)
  if length < 3:
    raise ValueError(f"{path}: max_seq_length={length} leaves no room for text")
  if length > cfg.max_length:
    logging.warning("convert: %s: max_seq_length=%d is above max_position_embeddings=%d; embed2 cuts "
                    "inputs at %d", path, length, cfg.max_length, cfg.max_length)
    length = cfg.max_length
  return length


def probe_texts(prompts: dict[str, str]) -> list[str]:
  """The texts a tokenizer read or written here is checked on: tokenizer.PROBE_TEXTS and the prompts."""
  return list(tok_lib.PROBE_TEXTS) + [p + t for p in prompts.values() for t in ("", tok_lib.PROBE_TEXTS[0])]


def _hf_tokenizer(folder: epath.Path, cfg: ModelConfig, prompts: dict[str, str]) -> SourceTokenizer:
  """Reads a Hugging Face tokenizer folder the way transformers (and so sentence-transformers) does,
  and checks that embed2's `HFTokenizer` gives the same ids on probe texts (prompts included)."""
  try:
    import transformers  # parity extra: reads the folder as HF does; pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f"{folder} holds a Hugging Face tokenizer; embed2.convert reads it the way transformers "
                     "does, which needs transformers (pip install -e '.[parity]', or pip install "
                     f"transformers): {e}. Nothing was written.") from None
  try:
    with local_folder(folder, TOKENIZER_FILES + ("config.json",)) as local:
      hf = transformers.AutoTokenizer.from_pretrained(str(local), local_files_only=True)
  except Exception as e:  # transformers raises many types for unreadable folders
    raise ValueError(f"transformers cannot load the tokenizer in {folder} ({type(e).__name__}: {e})") from None
  backend = getattr(hf, "backend_tokenizer", None)
  if backend is None:
    raise ValueError(f"the tokenizer in {folder} ({type(hf).__name__}) is not a fast (tokenizers) "
                     "tokenizer; embed2 reads tokenizer.json")
  if getattr(hf, "truncation_side", "right") != "right":
    raise UnsupportedArchitecture(f"the tokenizer in {folder} truncates on the {hf.truncation_side}; embed2 "
                                  "cuts over-long inputs at the end")
  data = json.loads(backend.to_str())
  data["truncation"] = data["padding"] = None  # set per call by transformers; embed2 cuts the text
  text = json.dumps(data, ensure_ascii=False)
  split = bool(getattr(hf, "split_special_tokens", False))
  ours = tok_lib.HFTokenizer(text, split_special_tokens=split, source=str(folder / "tokenizer.json"))
  if ours.base_vocab_size > cfg.vocab_size:
    raise ValueError(f"the tokenizer in {folder} has {ours.base_vocab_size} ids but the model's vocab_size is "
                     f"{cfg.vocab_size}; is it this model's tokenizer?")
  probes = probe_texts(prompts)
  for t in probes:
    want = list(hf(t, verbose=False)["input_ids"])
    got = ours.encode(t, add_bos=True, add_eos=True)
    if got != want:
      raise ValueError(f"embed2 cannot reproduce the tokenizer in {folder}: {t!r:.60} is {want[:16]} in "
                       f"transformers but {got[:16]} read from its tokenizer.json. Nothing was written.")
  config_path = folder / "tokenizer_config.json"
  config = _read_json(config_path) if config_path.exists() else {}
  config["split_special_tokens"] = split
  config.pop("truncation_side", None)
  limit = getattr(hf, "model_max_length", None)
  limit = int(limit) if isinstance(limit, (int, float)) and limit < 1e9 else None
  return SourceTokenizer(kind="tokenizers", folder=folder, json=text, config=config, model_max_length=limit)


def _source_tokenizer(fmt: str, dirs: Sequence[epath.Path], cfg: ModelConfig,
                      prompts: dict[str, str]) -> SourceTokenizer:
  """The source's own tokenizer: tokenizer.json (read as transformers reads it), or for a
  transformers folder with only a sentencepiece tokenizer.model, that model; refuses a folder with
  neither (an import must carry its tokenizer)."""
  folder = next((d for d in dirs if (d / "tokenizer.json").is_file()), None)
  spm_folder = next((d for d in dirs if (d / "tokenizer.model").is_file()), None)
  if folder is None and spm_folder is not None and fmt == "sentence-transformers":
    folder = spm_folder  # sentence-transformers tokenizes with what transformers converts it to
  if folder is not None:
    return _hf_tokenizer(folder, cfg, prompts)
  if spm_folder is not None:
    tok = tok_lib.Tokenizer.from_file(spm_folder / "tokenizer.model")
    if tok.vocab_size > cfg.vocab_size:
      raise ValueError(f"{spm_folder / 'tokenizer.model'} has {tok.vocab_size} ids (modality tokens "
                       f"appended) but the model's vocab_size is {cfg.vocab_size}")
    return SourceTokenizer(kind="sentencepiece", folder=spm_folder)
  raise FileNotFoundError(
      f"{' / '.join(str(d) for d in dirs)} holds no tokenizer (tokenizer.json, or a sentencepiece "
      "tokenizer.model); embed2 embeds a model only with its own tokenizer, so the import needs it: copy "
      "the model's tokenizer files beside its config.json. Nothing was written.")


LEGACY_POOLING = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                   "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                   "pooling_mode_lasttoken")


def _check_pooling(cfg: dict[str, Any], folder: epath.Path) -> None:
  if "pooling_mode" in cfg:
    mode = cfg["pooling_mode"]
    modes = [mode] if isinstance(mode, str) else list(mode)
  else:
    modes = [k for k in LEGACY_POOLING if cfg.get(k)]
    modes = ["mean" if m == "pooling_mode_mean_tokens" else m for m in modes]
  if modes != ["mean"]:
    raise UnsupportedArchitecture(f"{folder.name}: pooling {modes}; embed2 mean-pools the token states")
  if not cfg.get("include_prompt", True):
    raise UnsupportedArchitecture(f"{folder.name}: include_prompt=false leaves the prompt out of the mean; "
                                  "embed2 pools over every token of the input, prompt included")


def read_source(hf_dir: str | os.PathLike, *, text_only: bool = False) -> Source:
  """Reads config(s) and safetensors headers and checks that every tensor has a place.

  Raises:
    UnsupportedArchitecture: see `hf_config` (and `_check_pooling` for sentence-transformers heads).
    ValueError: missing, unexpected or mis-shaped tensors (each named).
    FileNotFoundError: no config.json / safetensors.
  """
  hf_dir = absolute(hf_dir)
  if not hf_dir.is_dir():
    raise FileNotFoundError(f"--hf_dir={hf_dir} is not a directory")
  dense_dirs, head_dims, prompts = [], [], {}
  if (hf_dir / "modules.json").exists():
    fmt = "sentence-transformers"
    model_dir, dense_dirs, head_dims, prompts = _sentence_transformers_modules(hf_dir)
  else:
    fmt, model_dir = "transformers", hf_dir
  hf_config = _read_json(model_dir / "config.json")
  cfg = model_config_from_hf(hf_config, head_dims=head_dims)
  default_prompt = _default_prompt_name(hf_dir, prompts) if fmt == "sentence-transformers" else None
  for name, prompt in prompts.items():
    tok_lib.check_text(prompt, f"{hf_dir / 'config_sentence_transformers.json'} prompt {name!r}")
  multimodal = hf_config.get("model_type") == "gemma3" and not text_only
  vcfg = vision_config_from_hf(hf_config) if multimodal else None

  tensors = read_headers(safetensors_files(model_dir))
  prefixes, names_re, ignored_re = layout.TEXT_NAMES[cfg.arch]
  text_prefix = layout.best_prefix(tensors, prefixes, names_re)
  if text_prefix is None:
    raise ValueError(f"no {cfg.arch} text tensors (names like {names_re.pattern!r}) in {model_dir}; "
                     f"its first tensors are {sorted(tensors)[:5]}")
  text = layout.text_entries(cfg, text_prefix)
  for folder in dense_dirs:
    tensors.update(read_headers(safetensors_files(hf_dir / folder), rename=lambda n, f=folder: f"{f}/{n}"))
  text += layout.head_entries(cfg, dense_dirs)

  vision, ignore = [], [ignored_re]
  tower_prefix = layout.best_prefix(tensors, layout.TOWER_PREFIXES, layout.TOWER_RE)
  if vcfg is not None:
    if tower_prefix is None:
      raise ValueError(f"config.json describes a multimodal Gemma 3 but {model_dir} has no vision tower "
                       "tensors (vision_tower.*); pass --text_only to convert the language model alone")
    projector_prefix = next((p for p in layout.PROJECTOR_PREFIXES if any(n.startswith(p) for n in tensors)),
                            layout.PROJECTOR_PREFIXES[-1])
    vision = layout.vision_entries(vcfg, tower_prefix, projector_prefix)
    if hf_config.get("vision_config", {}).get("vision_use_head", True):
      ignore.append(re.compile("^" + re.escape(tower_prefix) + r"head\."))  # SigLIP's pooling head: unused
  elif text_only:
    ignore += [re.compile("^(" + "|".join(re.escape(p) for p in layout.TOWER_PREFIXES + layout.PROJECTOR_PREFIXES) + ")")]

  expected = {e.hf_name: e for e in text + vision}
  missing = [n for n in expected if n not in tensors]
  ignored = sorted(n for n in tensors if n not in expected and any(r.match(n) for r in ignore))
  extra = sorted(n for n in tensors if n not in expected and n not in ignored)
  bad = [f"{n} has {tensors[n].shape}, config implies {e.hf_shape}" for n, e in expected.items()
         if n in tensors and tensors[n].shape != e.hf_shape]
  problems = []
  if missing:
    problems.append(f"missing tensors ({len(missing)}): {missing[:10]}")
  if extra:
    problems.append(f"unexpected tensors ({len(extra)}), which embed2's Gemma 3 has no place for: {extra[:10]}")
  if bad:
    problems.append(f"shape mismatches ({len(bad)}): {'; '.join(bad[:10])}")
  if problems:
    raise ValueError(f"checkpoint {hf_dir} does not match its config.json: " + " | ".join(problems) +
                     ". Nothing was written.")
  tok = _source_tokenizer(fmt, [model_dir] + ([hf_dir] if hf_dir != model_dir else []), cfg, prompts)
  max_seq_length = None
  if fmt == "sentence-transformers":
    limit = tok.model_max_length
    if limit is None and (tok.folder / "tokenizer_config.json").exists():
      value = _read_json(tok.folder / "tokenizer_config.json").get("model_max_length")
      limit = int(value) if isinstance(value, (int, float)) and value < 1e9 else None
    max_seq_length = _sentence_bert_max_length(model_dir, cfg, limit)
  return Source(hf_dir=hf_dir, format=fmt, hf_config=hf_config, model_config=cfg, vision_config=vcfg,
                text=text, vision=vision, tensors=tensors, ignored=ignored, tokenizer=tok, prompts=prompts,
                default_prompt_name=default_prompt, max_seq_length=max_seq_length)


# ================================================================================ folders


def absolute(path: str | os.PathLike) -> epath.Path:
  """`path` as an epath, made absolute when local (an object-store URI already is)."""
  path = epath.Path(path)
  return path if is_remote(path) else path.absolute()


@contextlib.contextmanager
def local_folder(folder: epath.Path, names: Sequence[str]) -> Iterator[epath.Path]:
  """`folder` itself when local; for a remote one, a temporary local folder holding those of `names`
  that `folder` has (for libraries that read local files only), removed on exit."""
  if not is_remote(folder):
    yield folder
    return
  with tempfile.TemporaryDirectory(prefix="embed2-convert-") as tmp:
    local = epath.Path(tmp)
    for name in names:
      if (folder / name).is_file():
        (local / name).write_bytes((folder / name).read_bytes())
    yield local


# ================================================================================ output directories


def check_out(out: epath.Path) -> None:
  """Refuses an `out` that exists and is not an empty directory."""
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise FileExistsError(f"--out={out} exists and is not empty; choose a new directory or delete it")


def tmp_dir(out: epath.Path) -> epath.Path:
  """Where the output is built: locally a fresh hidden sibling of `out` (the same filesystem, so `commit`
  renames it); on an object store, which has no rename, `out` itself, and the writer writes the file
  that makes the folder loadable last (an import's OUT/0 checkpoint, an export's config.json), so a
  killed conversion leaves a folder that loads nowhere (and that `check_out` refuses to reuse)."""
  if is_remote(out):
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  return out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"


def commit(tmp: epath.Path, out: epath.Path) -> None:
  """Renames the finished `tmp` (from `tmp_dir`) to `out`, so `out` appears complete or not at all."""
  if tmp == out:  # an object store: written in place
    return
  if out.exists():
    out.rmdir()  # empty (checked by check_out)
  tmp.rename(out)


def discard(tmp: epath.Path) -> None:
  """Removes what a failed conversion wrote into `tmp` (from `tmp_dir`)."""
  try:
    tmp.rmtree(missing_ok=True)
  except OSError as e:  # the conversion's own error is the one to report
    logging.warning("convert: could not remove %s (%s)", tmp, e)


# ================================================================================ tokenizer files


def write_source_tokenizer(tok: SourceTokenizer, directory: epath.Path) -> None:
  """The source's tokenizer files into the checkpoint folder (it is self-contained): verbatim, except
  tokenizer.json / tokenizer_config.json, written as read (see SourceTokenizer)."""
  directory.mkdir(parents=True, exist_ok=True)
  for name in TOKENIZER_FILES:
    if (tok.folder / name).is_file():
      (directory / name).write_bytes((tok.folder / name).read_bytes())
  if tok.kind == "tokenizers":
    (directory / "tokenizer.json").write_text(tok.json, encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(tok.config, indent=2, ensure_ascii=False),
                                                     encoding="utf-8")


def export_tokenizer_files(tokenizer: tok_lib.Tokenizer, hf_tokenizer: str | os.PathLike | None,
                            max_seq_length: int) -> dict[str, bytes]:
  """File name -> content of the tokenizer an export writes (see export_sentence_transformers)."""
  if hf_tokenizer:
    folder = epath.Path(hf_tokenizer)
    files = {f: (folder / f).read_bytes() for f in TOKENIZER_FILES if (folder / f).is_file()}
    if not files:
      raise FileNotFoundError(f"--hf_tokenizer={hf_tokenizer} has none of {TOKENIZER_FILES}")
    return files
  if isinstance(tokenizer, tok_lib.HFTokenizer):
    folder = epath.Path(tokenizer.source).parent
    files = {f: (folder / f).read_bytes() for f in TOKENIZER_FILES
             if f != "tokenizer.model" and (folder / f).is_file()}
    config = json.loads(files["tokenizer_config.json"]) if "tokenizer_config.json" in files else {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "<pad>" if tokenizer.backend.token_to_id("<pad>") is not None else None}
    config["split_special_tokens"] = tokenizer.split_special_tokens
    config["model_max_length"] = max_seq_length
    files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False).encode()
    return files
  text, config = tok_lib.sentencepiece_to_hf(tokenizer, model_max_length=max_seq_length)
  return {"tokenizer.json": text.encode(), "tokenizer_config.json": json.dumps(config, indent=2).encode()}


def check_exported_tokenizer(files: dict[str, bytes], tokenizer: tok_lib.Tokenizer,
                             prompts: dict[str, str]) -> None:
  """Loads the tokenizer an export will write (`files`: name -> content, config.json included: its
  model_type may pick the tokenizer class) as sentence-transformers will (transformers' AutoTokenizer;
  without transformers, embed2's HFTokenizer), from a temporary local folder, and refuses the export
  unless it gives `tokenizer`'s ids, framing included, on probe texts and the prompts, and pads a batch."""
  try:
    import transformers  # parity extra (else HFTokenizer checks); pylint: disable=g-import-not-at-top
  except ImportError:
    transformers = None
  probes = probe_texts(prompts)
  try:
    with tempfile.TemporaryDirectory(prefix="embed2-export-") as tmp:
      folder = epath.Path(tmp)
      for name, content in files.items():
        (folder / name).write_bytes(content)
      if transformers is not None:
        hf = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        got = [list(ids) for ids in hf(probes, verbose=False)["input_ids"]]
        hf(probes[:2], padding=True, verbose=False)  # sentence-transformers pads its batches: a pad token is needed
      else:
        reader = tok_lib.HFTokenizer.from_file(folder / "tokenizer.json")
        got = [reader.encode(t, add_bos=True, add_eos=True) for t in probes]
  except Exception as e:  # whatever the library raises, the export is refused with the reason
    raise ValueError(f"the tokenizer files written for the export do not load ({type(e).__name__}: {e}). "
                     "Nothing was written.") from None
  for t, ids in zip(probes, got):
    want = tokenizer.encode(t, add_bos=True, add_eos=True)
    if ids != want:
      raise ValueError(
          f"the exported tokenizer does not tokenize like the checkpoint's ({tokenizer.source}): {t!r:.60} "
          f"is {ids[:16]} there and {want[:16]} in embed2. Nothing was written.")
