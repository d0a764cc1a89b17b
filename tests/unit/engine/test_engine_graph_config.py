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


def test_graph_inputs_track_block_tables_across_growth_reallocation_and_shrinking():
    """The host inputs of a captured decode step equal, row by row, what the sequences say,
    although a row's table is copied only when it changed: a table that grows, a sequence
    replaced by one with as many blocks (a new allocation), a smaller batch, padding rows."""
    from types import SimpleNamespace

    from lorry.engine.graphs import GraphInputs

    gi = GraphInputs(rows=4, blocks=4, block_size=4, pin=False)

    def seq(table, tokens, epoch):
        return SimpleNamespace(block_table=table, num_tokens=tokens, last_token=tokens * 10,
                               table_epoch=epoch)

    def check(seqs, slots, size):
        gi.fill(seqs, slots, size)
        for i in range(size):
            s = seqs[i] if i < len(seqs) else None
            table = s.block_table if s else []
            assert gi.tables[i].tolist() == table + [0] * (4 - len(table)), (i, size)
            p = s.num_tokens - 1 if s else 0
            want = [s.last_token, p, slots[i], table[p // 4] * 4 + p % 4] if s else [0, 0, -1, 0]
            assert gi.host[:, i].tolist() == want, (i, size)

    a, b = seq([3, 4], 6, 1), seq([7], 2, 2)
    check([a, b], [0, -1], 4)
    a.block_table.append(9)
    a.num_tokens = 9                      # grew into a third block
    c = seq([8], 3, 3)                    # b finished; c has as many blocks, new allocation
    check([a, c], [1, 0], 4)
    check([c], [0], 1)                    # a smaller batch
    check([c, a], [0, 1], 4)              # rows 1.. were padding in between: rewritten
    a.block_table[:] = [5, 6, 2]          # a preempted and reallocated (same length)
    a.table_epoch = 4
    check([c, a], [0, 1], 2)
