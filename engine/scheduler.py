"""Continuous-batching scheduler: admit waiting sequences while rows and LoRA slots allow.

A step decodes every running sequence whose prompt is in the cache and prefills prompt chunks
with what is left of ``max_num_batched_tokens`` (one token per decoding row; a long prompt is
split over several steps): a mixed step, as vLLM's chunked prefill. A step without prompt
work is a plain decode step (replayed from a CUDA graph). When the decoding rows would take
more than half the budget, prompt steps and decode steps alternate instead (so prompts never
get less than alternation gives them). With ``mixed=False``, prefill and
decode steps alternate instead, so a long prompt delays each decode step by one chunk's step.
The distinct adapters of the running set (plus pinned ones) never exceed ``max_loras``, and
their blocks fit the LoRA slot memory together (``slot_memory``: engine.lora.slot_pages, shared
by rank): sequences whose adapter does not fit wait until a running adapter's sequences
finish. Aging: once later sequences have overtaken such a waiter ``max_bypass`` times, the
running adapter with the fewest rows (of those whose memory the waiter's block can take)
admits nobody more and no other waiter takes a new slot first, so that
adapter drains and the waiter gets its slot while the other running adapters keep admitting
(not while pinned adapters alone fill every slot: it waits for an unpin and the others go
on). Stopping all admission instead would empty the batch: with many adapters over few
slots most waiters age, and a bulk workload of 200 Zipf adapters over 32 slots averaged 66
rows of 256 that way (139 with the drain: ``benchmarks/schedule_replay.py``).

KV memory is paged (``engine.kv_cache.BlockManager``): a sequence is admitted when the pool
has blocks for its prefill tokens (cached prefix blocks are reused), and each decode step
first gives every decoding sequence room for its next token. When the pool runs out, the
most recently admitted sequence is preempted (vLLM's recompute): its blocks are released
and it waits at the front of the queue, to be prefilled again over its prompt and the
tokens it had generated. Admission is first come, first served with respect to blocks: a
waiting sequence that does not fit holds back the ones behind it, so long prompts are not
starved by short ones.
"""
from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from lorry.engine.kv_cache import BlockManager
from lorry.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledStep:
    """What the next model step runs."""

    seqs: list[Sequence]
    prefill: bool
    # prefill: prompt tokens of each of the first len(chunks) sequences; the sequences after
    # them decode one token each in the same step (a mixed step)
    chunks: list[int] = field(default_factory=list)
    # decode only: device steps in this round, each row's next token picked on the device
    # and fed to the next (every row has the blocks for all of them)
    steps: int = 1

    @property
    def prefilled(self) -> list[Sequence]:
        """The sequences whose prompt tokens the step puts in the cache."""
        return self.seqs[:len(self.chunks)] if self.prefill else []

    @property
    def decoded(self) -> list[Sequence]:
        """The sequences that decode one token in the step."""
        return self.seqs[len(self.chunks):] if self.prefill else self.seqs


class _CountPlanner:
    """Admissions where any ``max_loras`` adapters fit at once (no slot memory given)."""

    def __init__(self, max_loras: int, held: set[int]):
        self.max_loras, self.held = max_loras, set(held)

    def fits(self, lora_id: int) -> bool:
        return lora_id in self.held or len(self.held) < self.max_loras

    def add(self, lora_id: int) -> None:
        self.held.add(lora_id)


class Scheduler:
    def __init__(self, max_num_seqs: int, max_loras: int, blocks: BlockManager,
                 max_num_batched_tokens: int = 8192, max_bypass: int = 16,
                 mixed: bool = True, num_steps: int = 1, max_model_len: int | None = None,
                 prefill_min_tokens: int = 0, prefill_max_wait: int = 0):
        self.max_num_seqs = max_num_seqs
        self.max_loras = max_loras
        self.blocks = blocks
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_bypass = max_bypass
        self.mixed = mixed
        self.num_steps, self.max_model_len = num_steps, max_model_len
        # new prompts wait (decode rounds meanwhile) until the free rows would take this many
        # prompt tokens, or for at most prefill_max_wait device steps (_hold_prompts)
        # (alternating steps, mixed=False, already give prompts steps of their own: no hold;
        # nor with no wait allowed)
        self.prefill_min_tokens = prefill_min_tokens if mixed and prefill_max_wait > 0 else 0
        self.prefill_max_wait = prefill_max_wait
        self._held_steps = 0          # device steps decoded while new prompts were held
        self.held_rounds = 0          # decode plans made while holding (a stat)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []   # in admission order
        # lora id -> its running rows, kept with ``running`` (asked several times a step)
        self._adapter_rows: dict[int, int] = {}
        self._last_was_prefill = False
        self.preemptions = 0
        self.peak_running = 0
        self.watermark = max(1, blocks.usable() // 100)   # blocks kept free at admission
        # the LoRA slot memory (engine.lora.gpu_slots.GPUSlotManager: planner(held)); None:
        # any max_loras adapters fit at once
        self.slot_memory = None

    def _planner(self, held: set[int]):
        """Whether adapters fit next to ``held`` ones: fits(lid), and add(lid) as admitted."""
        if self.slot_memory is not None:
            return self.slot_memory.planner(held)
        return _CountPlanner(self.max_loras, held)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def running_adapters(self) -> set[int]:
        return set(self._adapter_rows)

    def _start(self, seq: Sequence) -> None:
        self.running.append(seq)
        lid = seq.lora_id
        if lid is not None:
            self._adapter_rows[lid] = self._adapter_rows.get(lid, 0) + 1

    def _stop(self, seq: Sequence) -> None:
        self.running.remove(seq)
        lid = seq.lora_id
        if lid is not None:
            left = self._adapter_rows[lid] - 1
            if left:
                self._adapter_rows[lid] = left
            else:
                del self._adapter_rows[lid]

    def schedule(self, pinned: set[int] = frozenset(),
                 ready: Callable[[Sequence], bool] | None = None,
                 rounds: bool = True) -> ScheduledStep:
        """The next step. ``ready(seq)``: its adapter can be used now (not still loading).
        ``rounds``: a decode step may be a round of ``num_steps`` device steps."""
        decoding = [s for s in self.running if not s.prefilling]
        before = self.preemptions
        budget, rows, reserved = self.max_num_batched_tokens, [], []
        if self.mixed and decoding:
            rows = reserved = self._reserve_decode(decoding)
            if self.preemptions > before:
                budget = 0  # the pool is short: no prompt work until it is not
            elif len(rows) <= budget // 2:
                budget -= len(rows)
            elif not self._last_was_prefill:
                # the rows would leave prompts less than half the budget, which alternating
                # gives them on average: prompts alone this step, then the rows
                rows = []
            else:
                budget = 0
        elif decoding and self._last_was_prefill:
            self._last_was_prefill = False
            return ScheduledStep(self._reserve_decode(decoding), False)
        # (decided once the rows have their blocks: a step that preempted admits nobody anyway)
        hold = self.preemptions == before and self._hold_prompts(len(decoding), len(rows))
        seqs, chunks = [], []
        for s in self.running:  # prompts already being prefilled go on first
            if s.prefilling and budget > 0:
                n = min(s.prefill_len - s.num_computed_tokens, budget)
                self.blocks.register(s, s.num_computed_tokens + n)
                seqs.append(s)
                chunks.append(n)
                budget -= n
        for s, n in self._admit(pinned, ready, 0 if hold else budget):
            seqs.append(s)
            chunks.append(n)
        if seqs:
            self._last_was_prefill = True
            self._held_steps = 0
            return ScheduledStep(seqs + rows, True, chunks)
        self._last_was_prefill = False
        rows = reserved if self.mixed else self._reserve_decode(decoding)
        # a round only when prompts were given the step and none could use it, and nobody
        # was preempted for this step: prompt work held back by alternation or preempted
        # rows waiting to be recomputed do not wait a whole round (admission that finds no
        # rows, blocks or adapter yet does: up to num_steps - 1 steps); prompts held for
        # want of tokens wait a round
        plan = (self._decode_step(rows, self.prefill_max_wait - self._held_steps if hold
                                  else None)
                if rounds and budget > 0 and self.preemptions == before
                else ScheduledStep(rows, False))
        if hold:
            self._held_steps += plan.steps
            self.held_rounds += 1
        return plan

    def _hold_prompts(self, decoding: int, rows: int) -> bool:
        """Whether new prompts wait this step (``prefill_min_tokens``; TGI's
        ``waiting_served_ratio`` and ``max_waiting_tokens`` in tokens): a step that carries
        prompt work runs eagerly, its host issues every layer's kernels one by one (tens of
        milliseconds however few its tokens), and its decode rows ride in it; a handful of
        new prompt tokens costs such a step nearly what thousands do. So while rows decode, no
        prompt is part-way through its prefill and the batch is at least half full, new
        prompts wait in decode rounds until the first waiters the free rows could take hold
        ``prefill_min_tokens`` prompt tokens (counted before prefix-cache hits; at most what
        the step's budget leaves its ``rows`` decode rows), for at most ``prefill_max_wait``
        device steps a hold. Never held: a preempted sequence's recompute (it had tokens
        already), nor waiters the free rows all fit (no later waiter could add tokens: the
        end of a bulk run, a service without a backlog). ``decoding``: the rows that had
        finished their prompt before the step."""
        free = self.max_num_seqs - len(self.running)
        if (not self.prefill_min_tokens or not decoding or not self.waiting
                or 2 * len(self.running) < self.max_num_seqs
                or decoding < len(self.running)       # a prompt is being prefilled
                or free >= len(self.waiting)
                or self.waiting[0].output_token_ids):   # a preempted row's recompute
            self._held_steps = 0
            return False
        if free <= 0 or self._held_steps >= self.prefill_max_wait:
            return False      # nobody could be admitted / the wait is over: admit
        want = min(self.prefill_min_tokens, self.max_num_batched_tokens - rows)
        tokens = 0
        for s in itertools.islice(self.waiting, free):
            tokens += s.prefill_len - s.num_computed_tokens
            if tokens >= want:
                return False
        return True

    def _decode_step(self, rows: list[Sequence], limit: int | None = None) -> ScheduledStep:
        """A decode-only step over ``rows`` (each with room for its next token), as a round
        of several device steps where every row picks its tokens on the device and the pool
        has the blocks for the round without preempting anyone (else one step)."""
        steps = self.num_steps if limit is None else max(1, min(self.num_steps, limit))
        if steps > 1 and rows and all(s.params.device_sampled for s in rows):
            left = [s.params.max_tokens - len(s.output_token_ids) for s in rows]
            # rows that end inside the round compute its last steps for nothing: at most
            # an eighth of the round's row-steps (as far as max_tokens tells)
            while steps > 1 and 8 * sum(steps - n for n in left if n < steps) > \
                    steps * len(rows):
                steps -= 1
            if self.max_model_len is not None:   # no step after a row's last
                steps = min(steps, min(self.max_model_len - s.num_tokens for s in rows))
            if steps > 1 and sum(self.blocks.extra_blocks(s, steps) for s in rows) \
                    <= self.blocks.num_free():
                for s in rows:
                    self.blocks.extend(s, steps)
                return ScheduledStep(rows, False, steps=steps)
        return ScheduledStep(rows, False)

    def _reserve_decode(self, decoding: list[Sequence]) -> list[Sequence]:
        """Room in the pool for each decoding sequence's next token, oldest first; preempts
        the newest running sequences while the pool is short. Returns those that step."""
        for seq in decoding:
            while seq.status is SequenceStatus.RUNNING and not self.blocks.append_slot(seq):
                self.preempt(self.running[-1])  # the newest: itself, once it is the newest
        return [s for s in decoding if s.status is SequenceStatus.RUNNING]

    def preempt(self, seq: Sequence, count: bool = True) -> None:
        """Release ``seq``'s blocks and queue it first, to prefill its prompt and generated
        tokens again (recompute); ``count``: a preemption for want of blocks (the stat)."""
        self._stop(seq)
        self.blocks.release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.prefill_len = seq.num_tokens
        self.waiting.appendleft(seq)
        self.preemptions += count

    def _admit(self, pinned, ready, budget: int) -> list[tuple[Sequence, int]]:
        """Admit waiting sequences in order while rows, slots, blocks and the token budget
        allow -> [(sequence, prefill tokens this step)]."""
        admitted: list[tuple[Sequence, int]] = []
        if len(self.running) >= self.max_num_seqs or budget <= 0 or not self.waiting:
            return admitted   # (before copying a long queue for nothing)
        adapters = self.running_adapters()
        room = self._planner(adapters | set(pinned))
        pins_only = None   # the planner of the pinned adapters alone, when asked
        passed_over: list[Sequence] = []   # waiting for an adapter slot, overtaken by later ones
        draining = None    # the running adapter whose slot an aged waiter gets once it drains
        for seq in list(self.waiting):
            if len(self.running) >= self.max_num_seqs or budget <= 0:
                break
            lid = seq.lora_id
            if lid is not None and lid not in adapters and not room.fits(lid):
                # aged: the running adapter with the fewest rows (not pinned) admits nobody
                # more, so its slot frees for this waiter; the other running adapters go
                # on admitting, and no other waiter takes a new slot before it -- unless pins
                # alone leave it no slot (then it waits for an unpin, the others go on)
                if pins_only is None and seq.bypassed >= self.max_bypass:
                    pins_only = self._planner(set(pinned))
                if seq.bypassed >= self.max_bypass and pins_only.fits(lid):
                    if draining is None:
                        draining = self._drain_victim(adapters - pinned, lid,
                                                      adapters | set(pinned))
                    continue
                passed_over.append(seq)
                continue  # waits for a slot; never an error
            if draining is not None and lid is not None and (lid == draining
                                                             or lid not in adapters):
                continue  # would keep the draining slot busy, or take the freed one first
            # asked only once it fits: waiters that cannot run yet start no loads (with many
            # distinct adapters waiting, their loads would evict each other from the CPU cache)
            if ready is not None and not ready(seq):
                if lid is not None and seq.bypassed >= self.max_bypass:
                    adapters.add(lid)  # an aged waiter's slot is held while its adapter loads
                    room.add(lid)
                continue  # its adapter is still loading: others go on meanwhile
            # a watermark while others run: their next decode steps need blocks too, and an
            # admission that took the last ones would be preempted again at once
            if not self.blocks.allocate(seq, self.watermark if self.running else 0):
                break     # the pool is short: nobody overtakes it
            n = min(seq.prefill_len - seq.num_computed_tokens, budget)
            self.blocks.register(seq, seq.num_computed_tokens + n)  # later admissions may hit
            budget -= n
            if lid is not None:
                adapters.add(lid)
                room.add(lid)
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            admitted.append((seq, n))
            self._start(seq)
            self.peak_running = max(self.peak_running, len(self.running))
            for w in passed_over:
                w.bypassed += 1
        return admitted

    def _drain_victim(self, candidates: set[int], waiter: int | None = None,
                      held: set[int] = frozenset()) -> int | None:
        """The running adapter (of ``candidates``) with the fewest running sequences -- of
        those whose memory, once drained, lets the ``waiter``'s adapter fit next to the other
        ``held`` ones where any does (with slot memory shared by rank, draining a small
        adapter may free no block large enough)."""
        counts = {lid: n for lid, n in self._adapter_rows.items() if lid in candidates}
        order = sorted(counts, key=lambda lid: (counts[lid], lid))
        if waiter is not None and self.slot_memory is not None:
            for lid in order:
                if self._planner(held - {lid}).fits(waiter):
                    return lid
        return order[0] if order else None

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence's blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self._stop(seq)
            self.blocks.release(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
