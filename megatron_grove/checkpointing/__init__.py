"""Training checkpoints: Megatron dist_checkpointing folders written atomically
(:mod:`.checkpoint`), each with a manifest of checksums verified on load (:mod:`.manifest`),
and optimizer state that resumes under another layout (:mod:`.optimizer_state`)."""

from megatron_grove.checkpointing.checkpoint import (
    TOKENIZER_DIR,
    CheckpointError,
    TrainState,
    checkpoint_dir,
    checkpoint_step,
    checkpoint_steps,
    checkpoint_tokenizer,
    latest_iteration,
    load_checkpoint,
    read_checkpoint_config,
    remove_checkpoints_after,
    resolve_checkpoint_folder,
    save_checkpoint,
    verify_checkpoint,
)

__all__ = ["CheckpointError", "TrainState", "save_checkpoint", "load_checkpoint",
           "latest_iteration", "checkpoint_dir", "checkpoint_steps", "checkpoint_step",
           "remove_checkpoints_after", "resolve_checkpoint_folder", "verify_checkpoint",
           "read_checkpoint_config", "checkpoint_tokenizer", "TOKENIZER_DIR"]
