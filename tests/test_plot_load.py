"""tools/plot_load.py: load matrices, group sums, imbalance, and the PNGs it writes."""

import json

import numpy as np
import pytest

from megatron_grove.training import load_plots as plot_load
from processes import run_script


def _records():
    # 3 steps, 2 layers, 4 experts; layer 0 evens out, layer 1 stays skewed
    loads = [[[8, 0, 0, 0], [5, 1, 1, 1]], [[4, 4, 0, 0], [5, 1, 1, 1]], [[2, 2, 2, 2], [5, 1, 1, 1]]]
    return [{"step": i + 1, "loss": 1.0, "expert_load": load} for i, load in enumerate(loads)]


def test_group_load_and_imbalance():
    steps, load = plot_load.load_matrix(_records())
    assert steps.tolist() == [1, 2, 3] and load.shape == (3, 2, 4)
    assert plot_load.group_load(load, 2)[0].tolist() == [[8, 0], [6, 2]]
    ratio = plot_load.imbalance(load)
    assert np.allclose(ratio[:, 0], [4.0, 2.0, 1.0]) and np.allclose(ratio[:, 1], 2.5)


@pytest.mark.e2e
def test_cli_writes_pngs(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    proc = run_script("tools/plot_load.py", str(metrics), "--groups", "2", "--out",
                      str(tmp_path / "plots"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert names == ["expert_load_layer0.png", "expert_load_layer1.png", "group_load_layer0.png",
                     "group_load_layer1.png", "imbalance.png"]
    assert all((tmp_path / "plots" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)


@pytest.mark.e2e
def test_cli_rejects_groups_not_dividing_experts(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    proc = run_script("tools/plot_load.py", str(metrics), "--groups", "3", timeout=120)
    assert proc.returncode == 2
    assert "--groups 3 does not divide the 4 experts" in proc.stderr
