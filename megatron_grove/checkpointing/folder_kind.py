"""What a folder given as a checkpoint holds when it is not one of ours: the one line that
says so (a Hugging Face checkpoint names the conversion command; anything else says what a
checkpoint folder holds)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["not_our_checkpoint"]

_HOLDS = ("a checkpoint folder is checkpoint.save of a run or tools/convert_checkpoint.py's "
          "--output: latest_checkpointed_iteration.txt and iter_NNNNNNN/ folders (or an "
          "iter_NNNNNNN/ folder itself, with metadata.json)")


def not_our_checkpoint(path: str | Path, latest_file: str) -> str:
    """The problem with ``path`` (no ``latest_file``, no ``metadata.json``), in one line."""
    path = Path(path)
    if not path.exists():
        return f"{path}: does not exist; {_HOLDS}"
    if not path.is_dir():
        return f"{path}: not a folder; {_HOLDS}"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        out = path.with_name(f"{path.name}_megatron")
        return (f"{path}: a Hugging Face checkpoint (config.json + safetensors), not a Megatron "
                "one; convert it first: python tools/convert_checkpoint.py --source-format hf "
                f"--target-format megatron --input {path} --output {out}, then set "
                f"checkpoint.load={out}")
    if not any(path.iterdir()):
        return f"{path}: empty; {_HOLDS}"
    return f"{path}: no {latest_file} there; {_HOLDS}"
