"""Paged KV cache bookkeeping: a pool of fixed-size blocks, per-sequence block tables and
prefix caching (as vLLM's block manager).

Each layer's keys and values live in ``[num_blocks * block_size, kv_heads, head_dim]``
tensors; position ``p`` of a sequence lives at slot ``table[p // bs] * bs + p % bs``. Block 0
is never handed out: padding tokens write there and padded block-table entries point there.

Prefix caching: once a full block of a sequence's prefill tokens is in the cache it is
registered under a digest of (previous block's digest, adapter key, its tokens), so the
digest names the whole prefix under that adapter. A later sequence whose leading blocks have
the same digests reuses those blocks (reference counted) and prefills only the rest. KV
computed under adapter A is not KV under adapter B: the adapter key (id, path, revision and
a generation bumped when the engine drops the adapter) is part of every digest. Blocks no
sequence holds keep their digest and sit in an LRU list; allocation takes never-registered
free blocks first, then evicts the least recently released cached block.
"""
from __future__ import annotations

import hashlib
import itertools
from array import array
from collections import OrderedDict, deque

NULL_BLOCK = 0


def _digest(parent: bytes, adapter: bytes, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)  # keyed by content, not Python's hash()
    h.update(adapter)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockManager:
    """Owns the free/cached blocks and every sequence's block table (``seq.block_table``)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.free: deque[int] = deque(range(1, num_blocks))     # never registered, unused
        self.digest_of: dict[int, bytes] = {}                   # block -> its digest
        self.cached: dict[bytes, int] = {}                      # digest -> block
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unused, registered (LRU first)
        self.query_tokens = self.hit_tokens = 0
        self._epochs = itertools.count(1)

    # ---- sizes ------------------------------------------------------------------------------
    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    def usable(self) -> int:
        """Blocks a sequence can ever hold (all but the null block)."""
        return self.num_blocks - 1

    # ---- prefixes ---------------------------------------------------------------------------
    def _digests(self, seq, tokens: list[int], n_blocks: int) -> list[bytes]:
        """Digests of ``seq``'s first ``n_blocks`` full blocks, kept on the sequence: its
        tokens only grow, so a block's digest never changes once computed."""
        out, bs, key = seq.block_digests, self.block_size, seq.adapter_key
        while len(out) < n_blocks:
            i = len(out)
            out.append(_digest(out[-1] if out else b"", key, tokens[i * bs:(i + 1) * bs]))
        return out[:n_blocks]

    def _cached_prefix(self, seq) -> list[int]:
        """Blocks holding the longest cached prefix of ``seq``'s prefill tokens, leaving at
        least one token to compute (its logits choose the next token)."""
        if not self.prefix_caching:
            return []
        tokens = seq.prefill_tokens
        hits = []
        for d in self._digests(seq, tokens, (len(tokens) - 1) // self.block_size):
            block = self.cached.get(d)
            if block is None:
                break
            hits.append(block)
        return hits

    # ---- allocation ---------------------------------------------------------------------------
    def _take(self) -> int:
        if self.free:
            block = self.free.popleft()
        else:  # evict the least recently released cached block
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.digest_of.pop(block)]
        self.ref[block] = 1
        return block

    def _hold(self, block: int) -> None:
        if self.ref[block] == 0:
            self.evictable.pop(block, None)
        self.ref[block] += 1

    def allocate(self, seq, reserve: int = 0) -> bool:
        """Give ``seq`` blocks for all its prefill tokens, reusing cached prefix blocks; sets
        ``seq.block_table`` and ``seq.num_computed_tokens``. False (nothing changed) when the
        pool lacks the blocks, or would keep fewer than ``reserve`` free afterwards."""
        tokens = len(seq.prefill_tokens)
        hits = self._cached_prefix(seq)
        need = self.blocks_for(tokens) - len(hits)
        # hit blocks sitting in the LRU list are not free for the new ones
        if need + reserve > self.num_free() - sum(1 for b in hits if self.ref[b] == 0):
            return False
        for b in hits:
            self._hold(b)
        seq.block_table = hits + [self._take() for _ in range(need)]
        seq.table_epoch = next(self._epochs)
        seq.num_computed_tokens = len(hits) * self.block_size
        self.query_tokens += tokens
        self.hit_tokens += seq.num_computed_tokens
        return True

    def append_slot(self, seq) -> bool:
        """Make room for the KV of ``seq``'s last token (written by the next decode step).
        False when the pool is empty (the caller preempts)."""
        if (seq.num_tokens - 1) // self.block_size < len(seq.block_table):
            return True
        if not self.num_free():
            return False
        seq.block_table.append(self._take())
        return True

    def extra_blocks(self, seq, steps: int) -> int:
        """Blocks ``seq`` lacks for the KV of its next ``steps`` decode steps (positions
        num_tokens - 1 .. num_tokens + steps - 2)."""
        return max(0, self.blocks_for(seq.num_tokens + steps - 1) - len(seq.block_table))

    def extend(self, seq, steps: int) -> None:
        """Give ``seq`` those blocks (the caller checked ``num_free``)."""
        for _ in range(self.extra_blocks(seq, steps)):
            seq.block_table.append(self._take())

    def register(self, seq, computed: int) -> None:
        """Register the full blocks among ``seq``'s first ``computed`` prefill tokens. The
        scheduler calls this for the tokens a step will compute, before it admits others in
        the same step: their hits read those keys after this step writes them (each layer
        writes every token's keys before any attention reads the cache)."""
        if not self.prefix_caching:
            return
        full = min(computed, len(seq.prefill_tokens)) // self.block_size
        digests = self._digests(seq, seq.prefill_tokens, full)
        for block, d in zip(seq.block_table, digests):
            if block in self.digest_of or d in self.cached:
                continue  # already registered, or the same prefix is cached in another block
            self.digest_of[block] = d
            self.cached[d] = block

    def unregister_uncomputed(self, seq) -> None:
        """Forget the digests of ``seq``'s blocks past its computed tokens: a step that
        registered them failed before writing their keys."""
        for block in seq.block_table[seq.num_computed_tokens // self.block_size:]:
            d = self.digest_of.pop(block, None)
            if d is not None:
                del self.cached[d]

    def release(self, seq) -> None:
        """Drop ``seq``'s hold on its blocks; the tail is released first, so under eviction a
        shared prefix's head outlives its tail."""
        for block in reversed(seq.block_table):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                if block in self.digest_of:
                    self.evictable[block] = None
                else:
                    self.free.append(block)
        seq.block_table = []

    def stats(self) -> dict:
        q = self.query_tokens
        return {"block_size": self.block_size, "blocks_total": self.usable(),
                "blocks_free": self.num_free(), "blocks_cached": len(self.cached),
                "prefix_caching": self.prefix_caching, "prefix_query_tokens": q,
                "prefix_hit_tokens": self.hit_tokens,
                "prefix_hit_rate": round(self.hit_tokens / q, 4) if q else 0.0}
