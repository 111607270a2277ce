"""--dry-run: parameter accounting of the real model built on the meta device."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dry_run(config: str, *overrides: str) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain_grove.py"), "--config",
                           str(ROOT / "configs" / config), "--dry-run", "--json", *overrides],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "activated per token (min)" in proc.stdout
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_grovemoe_33b_matches_the_released_model():
    plan = dry_run("grovemoe_33b_a3b.yaml")
    assert 32.5e9 < plan["total_params"] < 33.5e9  # "~33B total"
    # one adjugate: SwiGLU 2048 -> 128 -> 2048; one routed expert: 2048 -> 768 -> 2048
    assert plan["params_per_adjugate"] == 3 * 2048 * 128
    assert plan["params_per_expert"] == 3 * 2048 * 768
    assert (plan["groups_hit_min"], plan["groups_hit_max"]) == (4, 8)
    width = plan["activated_params_max"] - plan["activated_params_min"]
    assert width == 4 * 48 * 3 * 2048 * 128  # 4 groups x 48 layers of adjugate weights
    assert plan["adjugate_params"] == 48 * 64 * 3 * 2048 * 128
    # EP=8 keeps 1/8 of the experts and adjugates per rank, all dense weights, bf16
    expected = plan["dense_params"] + (plan["routed_expert_params"] + plan["adjugate_params"]) // 8
    assert plan["params_per_rank"] == expected
    assert plan["param_bytes_per_rank"] == 2 * expected


def test_fewer_groups_widen_the_activated_range():
    g16 = dry_run("grovemoe_33b_g16.yaml")
    assert (g16["groups_hit_min"], g16["groups_hit_max"]) == (1, 8)
    assert g16["activated_params_max"] - g16["activated_params_min"] == 7 * 48 * 3 * 2048 * 128


def test_plain_moe_has_no_adjugates():
    plan = dry_run("tiny_cpu.yaml", "moe.num_expert_groups=0")
    assert plan["adjugate_params"] == 0
    assert plan["activated_params_min"] == plan["activated_params_max"]
