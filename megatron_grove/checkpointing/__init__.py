"""Training checkpoints: Megatron dist_checkpointing folders written atomically
(:mod:`.checkpoint`), with optimizer state that resumes under another layout
(:mod:`.optimizer_state`)."""

from megatron_grove.checkpointing.checkpoint import (
                                                     TOKENIZER_DIR,
                                                     CheckpointError,
                                                     TrainState,
                                                     checkpoint_dir,
                                                     checkpoint_tokenizer,
                                                     latest_iteration,
                                                     load_checkpoint,
                                                     read_checkpoint_config,
                                                     resolve_checkpoint_folder,
                                                     save_checkpoint,
)

__all__ = ["CheckpointError", "TrainState", "save_checkpoint", "load_checkpoint",
           "latest_iteration", "checkpoint_dir", "resolve_checkpoint_folder",
           "read_checkpoint_config", "checkpoint_tokenizer", "TOKENIZER_DIR"]
