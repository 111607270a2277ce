"""Training data: tokenizers (:mod:`.tokenizer`), Megatron indexed datasets and the embedded
Shakespeare corpus (:mod:`.datasets`), and Megatron's GPTDataset / BlendedDataset over blends and
split strings (:mod:`.blends`)."""

from megatron_grove.data.blends import (
    Blend,
    build_gpt_datasets,
    check_sources,
    megatron_blend,
    samples_per_prefix,
)
from megatron_grove.data.datasets import (
    CACHE_ENV_VAR,
    EmptyDatasetError,
    cache_root,
    embedded_corpus_prefix,
    embedded_train_documents,
    embedded_train_files,
    heldout_text_path,
    tokenize_to_indexed_dataset,
    write_indexed_dataset,
)

__all__ = ["CACHE_ENV_VAR", "cache_root", "embedded_train_files", "embedded_train_documents",
           "heldout_text_path", "EmptyDatasetError", "write_indexed_dataset",
           "tokenize_to_indexed_dataset", "embedded_corpus_prefix", "Blend", "megatron_blend",
           "check_sources", "build_gpt_datasets", "samples_per_prefix"]
