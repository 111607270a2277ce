"""checkpoint.load at a folder that is not ours: a Hugging Face checkpoint names the
conversion command; an empty, unrelated or missing folder says what a checkpoint folder
holds (one line, a CheckpointError: exit 2)."""

import pytest

from processes import TINY
from megatron_grove.checkpointing import CheckpointError
from megatron_grove.config import load_config
from megatron_grove.training.resume import choose_start

HOLDS = ("a checkpoint folder is checkpoint.save of a run or tools/convert_checkpoint.py's "
         "--output: latest_checkpointed_iteration.txt and iter_NNNNNNN/ folders")


def _start_error(folder) -> str:
    with pytest.raises(CheckpointError) as caught:
        choose_start(load_config(str(TINY), [f"checkpoint.load={folder}"]))
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_a_hugging_face_folder_names_the_conversion_command(tmp_path) -> None:
    hf = tmp_path / "qwen3_moe"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "qwen3_moe"}')
    (hf / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 8)
    out = tmp_path / "qwen3_moe_megatron"
    assert _start_error(hf) == (
        f"{hf}: a Hugging Face checkpoint (config.json + safetensors), not a Megatron one; "
        f"convert it first: python tools/convert_checkpoint.py --source-format hf "
        f"--target-format megatron --input {hf} --output {out}, then set checkpoint.load={out}")


def test_empty_unrelated_and_missing_folders_say_what_a_checkpoint_holds(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    assert _start_error(tmp_path / "empty").startswith(f"{tmp_path / 'empty'}: empty; {HOLDS}")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"jpg")
    (tmp_path / "photos" / "config.json").write_text("{}")  # config.json alone is not HF
    assert _start_error(tmp_path / "photos").startswith(
        f"{tmp_path / 'photos'}: no latest_checkpointed_iteration.txt there; {HOLDS}")
    assert _start_error(tmp_path / "nope").startswith(f"{tmp_path / 'nope'}: does not exist; ")
