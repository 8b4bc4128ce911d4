"""Hugging Face Gemma 3 / EmbeddingGemma checkpoints <-> embed2 checkpoints.

Import (`convert_hf`: safetensors -> an embed2 parameters-only checkpoint that `config.init_from` and
`Embedder.from_checkpoint` load) and export (`export_sentence_transformers`: the text encoder of an
embed2 checkpoint -> a sentence-transformers folder); the command line is `python -m embed2.convert`
(`__main__.py` lists its uses, `program.py` holds its flags).

The source folder holds either
  * a transformers folder (config.json + *.safetensors, sharded or not) of Gemma3TextModel,
    Gemma3ForCausalLM (lm_head is ignored: embed2 has no LM head) or Gemma3ForConditionalGeneration
    (the language model, the SigLIP vision tower and the multimodal projector); or
  * a sentence-transformers folder (modules.json), like EmbeddingGemma: the Gemma3TextModel backbone,
    mean Pooling, bias-free Dense layers with identity activation (-> config.model.head_dims),
    Normalize. Its prompts and default_prompt_name (config_sentence_transformers.json) and the length
    it cuts inputs at (sentence_bert_config.json's max_seq_length, else the tokenizer's
    model_max_length capped at max_position_embeddings) go into the meta; `Embedder` applies them as
    sentence-transformers does (the "query" prompt to queries, "document" to documents).

An import's OUT receives
  OUT/0/{params,meta}   the text model as `EmbeddingModel` parameters; meta holds model_config,
                        tokenizer (absolute path of OUT/tokenizer.json or OUT/tokenizer.model; a moved
                        OUT is found by name), tokenizer_kind, task_strings, for sentence-transformers
                        sources prompts, default_prompt_name and max_seq_length, and source (where it
                        came from, which tensors were ignored)
  OUT/vision/0/...      multimodal sources only: `embed2.model.vision.VisionEncoder` parameters and
                        meta.vision_config; load with `load_vision_params`
  OUT/tokenizer.json, tokenizer_config.json, special_tokens_map.json, tokenizer.model
                        the source's tokenizer files (those it has)

Every folder (source, output, checkpoint) may be local or on an object store (`gs://`, `s3://`): files
go through etils.epath, checkpoints through Orbax (folders.py says how an output is made complete there).

The modules, in the order the data flows:
  safetensors_io.py   the safetensors format (memory-mapped reads, one-tensor-at-a-time writes)
  hf_config.py        config.json <-> ModelConfig / VisionConfig; what cannot be represented is refused
  layout.py           the tables: HF tensor names and shapes <-> paths in embed2's parameter tree
  folders.py          reading a transformers / sentence-transformers folder (tensors, tokenizer,
                      prompts) and writing tokenizer files; the output directory, renamed into place
                      only when complete
  hf_import.py        convert_hf, load_vision_params: tensors placed shard by shard on a mesh
  hf_export.py        export_sentence_transformers
"""

from embed2.convert.folders import DTYPES, TOKENIZER_FILES, Source, SourceTokenizer, read_source
from embed2.convert.hf_config import (UnsupportedArchitecture, hf_config_from_model_config,
                                      model_config_from_hf, vision_config_from_hf)
from embed2.convert.hf_export import export_sentence_transformers
from embed2.convert.hf_import import convert_hf, load_vision_params
from embed2.convert.layout import Entry, head_entries, text_entries, vision_entries
from embed2.convert.program import main
from embed2.convert.safetensors_io import TensorInfo, load_tensor, read_safetensors_header, write_safetensors
