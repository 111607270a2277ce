"""Training data: tokenizers (:mod:`.tokenizer`) and Megatron indexed datasets served by
Megatron's ``GPTDataset``, with the embedded Shakespeare corpus (:mod:`.datasets`)."""

from megatron_grove.data.datasets import (
                                          CACHE_ENV_VAR,
                                          build_gpt_dataset,
                                          cache_root,
                                          embedded_corpus_prefix,
                                          embedded_train_files,
                                          heldout_text_path,
                                          tokenize_to_indexed_dataset,
)

__all__ = ["CACHE_ENV_VAR", "cache_root", "embedded_train_files", "heldout_text_path",
           "tokenize_to_indexed_dataset", "embedded_corpus_prefix", "build_gpt_dataset"]
