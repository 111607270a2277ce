"""Our GroveMoE modelling code for Hugging Face ``transformers`` 5.x, copied into every GroveMoE
export (``config.json`` names it in ``auto_map``; load with ``trust_remote_code=True``).

The two modules are self-contained (they import only ``torch`` and ``transformers``, and each
other relatively), because ``transformers`` runs them from a copy in its modules cache.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["REMOTE_CODE_FILES", "AUTO_MAP", "ARCHITECTURE", "MODEL_TYPE", "source"]

_HERE = Path(__file__).resolve().parent
REMOTE_CODE_FILES = ("configuration_grove_moe.py", "modeling_grove_moe.py")
MODEL_TYPE = "grove_moe"
ARCHITECTURE = "GroveMoeForCausalLM"
AUTO_MAP = {"AutoConfig": "configuration_grove_moe.GroveMoeConfig",
            "AutoModel": "modeling_grove_moe.GroveMoeModel",
            "AutoModelForCausalLM": "modeling_grove_moe.GroveMoeForCausalLM"}


def source(name: str) -> str:
    """The text of the modelling file ``name`` (one of :data:`REMOTE_CODE_FILES`)."""
    if name not in REMOTE_CODE_FILES:
        raise KeyError(name)
    return (_HERE / name).read_text()
