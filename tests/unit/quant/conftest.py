"""Tiny base model and adapters of different ranks shared by the quantization tests."""
from __future__ import annotations

import pytest

from lorry.testing import make_tiny_base_and_adapters

# in_features of every linear (64, 128) is a multiple of bitsandbytes' 4-bit block (64), so
# quantizing a fused q/k/v weight gives the same blocks as quantizing q, k, v apart (as HF does)
ADAPTERS = {  # name -> (rank, alpha, targets, rslora)
    "qv8": (8, 16, ("q_proj", "v_proj"), False),
    "all4": (4, 8, "all-linear", True),
    "mlp16": (16, 8, ("gate_proj", "up_proj", "down_proj"), False),
}
# uneven prompts; each adapter, a row without adapter, one adapter twice
PROMPTS = [[5, 9, 33, 70, 12], [40, 41], [7, 8, 9, 10, 11, 12, 13], [99, 3, 60], [17] * 4]
ROW_ADAPTERS = ["qv8", None, "all4", "mlp16", "qv8"]
NEW_TOKENS = 4


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    base, paths = make_tiny_base_and_adapters(
        root, ADAPTERS, seed_offset=1, init_scale=0.3, hidden_size=64, num_layers=2,
        num_heads=4, num_kv_heads=2, intermediate_size=128)
    return root, base, paths
