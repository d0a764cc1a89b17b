"""CPU-side parts of the CUDA-graph decode: the bucket ladder and the enforce_eager setting."""
from __future__ import annotations

import pytest

from lorry.engine import EngineConfig
from lorry.engine.graphs import size_ladder


def test_ladder_covers_every_batch_size_up_to_max_num_seqs():
    assert size_ladder(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert size_ladder(5) == [1, 2, 4, 5]
    assert size_ladder(1) == [1]
    assert size_ladder(40) == [1, 2, 4, 8, 16, 32, 40]


def test_enforce_eager_must_be_a_bool(tmp_path):
    assert EngineConfig(model=str(tmp_path)).enforce_eager is False
    with pytest.raises(ValueError, match="enforce_eager='yes'"):
        EngineConfig(model=str(tmp_path), enforce_eager="yes")


def test_lora_fold_must_be_a_bool(tmp_path):
    assert EngineConfig(model=str(tmp_path)).lora_fold is True
    with pytest.raises(ValueError, match="lora_fold=1"):
        EngineConfig(model=str(tmp_path), lora_fold=1)
