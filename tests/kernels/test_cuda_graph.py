"""Graph replay of meta building + Triton add_lora equals eager runs (needs CUDA)."""
from __future__ import annotations

import pytest
import torch

from lorry.kernels.backends import get_lora_ops
from lorry.kernels.segments import build_lora_meta
from tests.kernels.cases import loop_reference, make_problem, rel_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.mark.parametrize("pdl", [0, 1])
@pytest.mark.parametrize("num_tokens", [7, 64, 300])
def test_graph_replay_matches_eager_for_new_slots_and_inputs(num_tokens, pdl, monkeypatch):
    # pdl: the decode path's shrink and expand as programmatic dependent launches (Hopper;
    # plain launches elsewhere), captured and replayed with the rest of the step.
    from lorry.kernels import lora_decode
    default = lora_decode.decode_config(torch.device("cuda"))
    monkeypatch.setattr(lora_decode, "DECODE_CONFIG", dict(default, pdl=pdl,
                                                           min_expand_cols=0))
    ops = get_lora_ops("triton")
    p = make_problem(num_tokens=num_tokens, hidden=200, widths=[96, 32, 32], max_rank=16,
                     ranks=[16, 8, 1], mix="some_without", dtype=torch.bfloat16,
                     device=torch.device("cuda"))
    L = p.meta.max_loras
    x, slots, y = p.x.clone(), p.slots.clone(), p.y.clone()     # static graph inputs/outputs
    y_base = p.y.clone()

    def step():
        y.copy_(y_base)
        meta = build_lora_meta(slots, L)
        ops.add_lora(y, x, p.lora_a, p.lora_b, meta, p.offsets)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()                                  # warm-up compiles the kernels
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        # New adapters per token and new activations, written into the captured buffers.
        slots.copy_(torch.randint(-1, L, (num_tokens,), generator=gen).to(slots))
        x.copy_(torch.randn(num_tokens, x.shape[1], generator=gen).to(x))
        graph.replay()
        torch.cuda.synchronize()
        p.x, p.slots, p.meta = x, slots, build_lora_meta(slots, L)
        eager = p.y.clone()
        ops.add_lora(eager, x, p.lora_a, p.lora_b, p.meta, p.offsets)
        assert torch.equal(y, eager)
        assert rel_error(y, loop_reference(p)) < 2e-2

