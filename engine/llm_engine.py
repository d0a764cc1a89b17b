"""LLMEngine: vLLM-shaped generation over one base model with many LoRA adapters per batch."""
from __future__ import annotations

import itertools
import time

import torch

from lorry.engine.config import EngineConfig
from lorry.engine.errors import LoRAError, ModelLengthError
from lorry.engine.lora.request import LoRARequest
from lorry.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from lorry.engine.sampler import NOT_FINITE, RoundSampler, sample, token_logprobs
from lorry.engine.sampling_params import SamplingParams
from lorry.engine.sequence import Sequence, SequenceStatus
from lorry.engine.setup import build_engine_parts
from lorry.engine.tokenizer import find_stop


GENERATE_ORDERS = ("longest_first", "input")


def longest_first(max_tokens: list[int]) -> list[int]:
    """Indices in the order ``generate`` submits them by default: the longest answers first,
    ties in input order. A row holds its batch place (and its adapter's slot) until its last
    token, so the long rows admitted last decide how long a batch takes to drain: the
    longest-processing-time-first rule for makespan. On the bulk workload's schedule it takes
    23% fewer steps with 32 adapter slots and 28% fewer without a slot limit
    (``benchmarks/schedule_replay.py --order input longest_first``)."""
    return sorted(range(len(max_tokens)), key=lambda i: (-max_tokens[i], i))


class LLMEngine:
    """One base model, its tokenizer, adapter caches and a continuous-batching loop.

    Parameters
    ----------
    config : EngineConfig
        What to load and the batch/cache limits.
    """

    def __init__(self, config: EngineConfig):
        self.config = config
        p = build_engine_parts(config)
        self.device, self.dtype, self.model_dir = p.device, p.dtype, p.model_dir
        self.hf_config, self.model, self.tokenizer = p.hf_config, p.model, p.tokenizer
        self.max_model_len, self.lora_backend = p.max_model_len, p.lora_backend
        self.loras, self.runner, self.scheduler = p.loras, p.runner, p.scheduler
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self._seqs: dict[str, Sequence] = {}
        self._load_errors: dict[str, Exception] = {}  # request id -> its adapter's LoRAError
        self._generating: set[str] = set()             # request ids of generate() calls
        self._aborted: dict[str, RequestOutput] = {}   # of those, aborted meanwhile
        # requests of add_request that finished inside a generate() call: the next step's
        self._finished_aside: list[RequestOutput] = []
        self._ids = itertools.count()
        self._adapter_gen: dict[int, int] = {}          # adapter id -> times dropped
        # prefill: steps with prompt work (mixed: also decoding rows); decode: steps without
        # adapters / lora_ranks: distinct adapters of each step and the sum of their ranks,
        # summed over steps (a step's LoRA reads each of its adapters' A and B: lora_ranks /
        # steps is the rank rows a step needs; the kernels read whole 16-row groups)
        self._steps = {"prefill": {"steps": 0, "seconds": 0.0, "tokens": 0, "rows": 0,
                                   "mixed": 0, "adapters": 0, "lora_ranks": 0},
                       "decode": {"steps": 0, "seconds": 0.0, "rows": 0, "max_batch": 0,
                                  "rounds": 0, "adapters": 0, "lora_ranks": 0},
                       # steps that ran nothing and waited for an adapter load instead
                       "load_wait": {"steps": 0, "seconds": 0.0}}
        # optional callable(request_id, text, finish_reason): the new text of each request
        # with SamplingParams.stream, every step (finish_reason None until its last call)
        self.on_tokens = None

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    lora_request: LoRARequest | None = None) -> None:
        """Queue a request (text, token ids or chat messages). Refusals change nothing."""
        params = params or SamplingParams()
        if request_id in self._seqs:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if lora_request is not None:
            self._check_lora_usable(lora_request)
            gpu, lid = self.loras.gpu, lora_request.lora_int_id
            if lid not in gpu.pinned and len(gpu.pinned) >= self.config.max_loras:
                raise LoRAError(f"adapter {lora_request.lora_name!r} cannot run: all max_loras="
                                f"{self.config.max_loras} GPU slots are pinned; unpin one")
            if gpu.pinned and lid not in gpu.pinned and lid in gpu.rank_of \
                    and not gpu.planner(set(gpu.pinned)).fits(lid):
                raise LoRAError(f"adapter {lora_request.lora_name!r} cannot run: pinned adapters "
                                f"hold the LoRA slot memory its rank needs "
                                f"({gpu.pages_for(lid) * gpu.page} of {gpu.num_rows} rows); "
                                "unpin one")
        text, ids = self.tokenizer.encode_prompt(prompt)
        if not ids:  # "" with a tokenizer that adds no BOS: nothing to choose a token from
            raise ValueError(f"prompt of request {request_id!r} has no tokens: give a prompt "
                             "that encodes to at least one token")
        if len(ids) >= self.max_model_len:
            raise ModelLengthError(f"prompt of request {request_id!r} has {len(ids)} tokens; "
                                   f"max_model_len={self.max_model_len} leaves no room to generate")
        vocab = self.hf_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids of {request_id!r} must lie in [0, {vocab})")
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        seq = Sequence(request_id, text, ids, params, lora_request,
                       RequestMetrics(arrival_time=time.time()), generator=gen,
                       adapter_key=self._adapter_key(lora_request))
        if lora_request is not None:  # only once the request is accepted: refusals load nothing
            # disk -> CPU in the background: the request waits, running ones keep stepping
            self.loras.prefetch(lora_request)
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def _adapter_key(self, req: LoRARequest | None) -> bytes:
        """What prefix-cache digests hold of the adapter: its id, files and revision, and how
        often the engine dropped it (files changed in place under the same id and path)."""
        if req is None:
            return b""
        gen = self._adapter_gen.get(req.lora_int_id, 0)
        return repr((req.lora_int_id, str(req.lora_path), req.revision, gen)).encode()

    def _drop_adapter(self, lid: int) -> bool:
        self._adapter_gen[lid] = self._adapter_gen.get(lid, 0) + 1
        return bool(self.loras.remove(lid))

    def _check_lora_usable(self, req: LoRARequest) -> None:
        if self.loras is None:
            raise LoRAError(f"adapter {req.lora_name!r} requested but the engine was created "
                            "with enable_lora=False")
        if not isinstance(req, LoRARequest):
            raise LoRAError(f"lora_request must be a LoRARequest, got {type(req).__name__}")
        lid = req.lora_int_id
        pending = self.loras.pending.get(lid)
        old = self.loras.known.get(lid) or (pending[0] if pending else None)
        if old is not None and (old.lora_path, old.revision) != (req.lora_path, req.revision):
            # new files under a known id: the cached copies are stale, drop them first
            in_use = [s.request_id for s in self._seqs.values() if s.lora_id == lid]
            if in_use or lid in self.loras.gpu.pinned:
                why = f"unfinished requests {in_use[:5]} use" if in_use else "it is pinned with"
                raise LoRAError(
                    f"adapter id {lid} ({req.lora_name!r}) cannot switch to {req.lora_path!r} "
                    f"(revision {req.revision!r}): {why} {old.lora_path!r} (revision "
                    f"{old.revision!r}); wait for them, unpin, or give the new files another id")
            self._drop_adapter(lid)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request; returns its partial output (finish_reason "abort") or None."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq)
        out = self._finish(seq, "abort")
        if request_id in self._generating:  # generate() returns it, never waits for it
            self._aborted[request_id] = out
        return out

    def is_waiting(self, request_id: str) -> bool:
        """Whether the request is queued and has never run: not admitted, no token of it
        computed (a preempted request, which has, is not)."""
        seq = self._seqs.get(request_id)
        return (seq is not None and seq.status is SequenceStatus.WAITING
                and seq.num_computed_tokens == 0 and not seq.output_token_ids)

    def has_unfinished_requests(self) -> bool:
        """Requests queued or running, or finished but not yet returned by ``step``."""
        return self.scheduler.has_unfinished() or bool(self._finished_aside)

    def num_unfinished_requests(self) -> int:
        return self.scheduler.num_unfinished() + len(self._finished_aside)

    # ---- the loop -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one prefill (chunk) or decode step; return the requests that finished in it
        (including requests failed because their adapter could not be loaded, and those
        that finished while a ``generate`` call stepped: kept until a step returns)."""
        finished = self._step()
        if self._finished_aside:
            finished, self._finished_aside = self._finished_aside + finished, []
        return finished

    def _step(self) -> list[RequestOutput]:
        finished = self._poll_adapters()
        pinned = set(self.loras.gpu.pinned) if self.loras else set()
        # a logits hook sees every step's logits: no rounds
        plan = self.scheduler.schedule(pinned, self._adapter_ready,
                                       rounds=self.runner.logits_hook is None)
        seqs = plan.seqs
        if not seqs:
            if (self.loras is not None and self.loras.loading() and not finished
                    and not self._finished_aside):
                t0 = time.perf_counter()
                self.loras.wait_any(0.05)  # nothing runs until an adapter arrives: do not spin
                wait = self._steps["load_wait"]
                wait["steps"] += 1
                wait["seconds"] += time.perf_counter() - t0
            return finished
        t0 = time.time()
        try:
            slots = self._slots(plan, t0)
            if plan.prefill:
                logits = self.runner.prefill(seqs, slots, plan.chunks)
        except BaseException:
            if plan.prefill:
                self._roll_back(plan)
            raise
        if plan.steps > 1:
            return finished + self._round(plan, slots, t0)
        if plan.prefill:
            done = []
            for i, (s, c) in enumerate(zip(seqs, plan.chunks)):
                # what its allocation found cached, kept at its first chunk that ran: a
                # rolled-back step's hits may be blocks it never wrote, a recompute's its own
                if s.num_cached_tokens < 0:
                    s.num_cached_tokens = s.num_computed_tokens
                s.num_computed_tokens += c
                if not s.prefilling:
                    done.append(i)
            done += range(len(plan.chunks), len(seqs))   # a mixed step's decode rows
            if len(done) < len(seqs):  # sample only where the prefill is complete
                logits, seqs = logits[done], [seqs[i] for i in done]
        else:
            logits = self.runner.decode(seqs, slots)
        if self.loras is not None:
            self.loras.gpu.mark_used(slots)
        if not seqs:
            self._count_step(plan, t0)
            return finished
        tokens = sample(logits, seqs, self.generator)
        self._count_step(plan, t0)
        logprobs = token_logprobs(logits, seqs, [max(t, 0) for t in tokens])
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            if seq.status is SequenceStatus.FINISHED:
                continue  # aborted by an on_tokens callback earlier in this loop
            if token == NOT_FINITE:
                finished.append(self._fail_not_finite(seq))
                continue
            if i in logprobs:
                if seq.logprobs is None:
                    seq.logprobs = []
                seq.logprobs.append(logprobs[i])
            out = self._add_token(seq, token)
            if out is not None:
                finished.append(out)
            elif seq.params.stream:
                self._stream(seq)
        return finished

    def _add_token(self, seq: Sequence, token: int) -> RequestOutput | None:
        """Add a sampled token; the request's output if that finished it."""
        reason = self._append(seq, token)
        if not reason:
            return None
        self._seqs.pop(seq.request_id, None)
        self.scheduler.finish(seq)
        return self._finish(seq, reason)

    def _round(self, plan, slots: list[int], t0: float) -> list[RequestOutput]:
        """A round of ``plan.steps`` device decode steps (rows that need no host sampling):
        the tokens come back once and are added in order; a row that finishes inside the
        round drops the tokens computed after its last (the KV they wrote is in its own
        blocks, released)."""
        pick = RoundSampler(plan.seqs, self.generator, self.device)
        tokens = pick.marked(self.runner.decode_steps(plan.seqs, slots, plan.steps,
                                                      pick)).tolist()
        if self.loras is not None:
            self.loras.gpu.mark_used(slots)
        finished, kept = [], 0
        for row in tokens:
            for seq, token in zip(plan.seqs, row):
                if seq.status is SequenceStatus.FINISHED:
                    continue  # ended earlier in the round, or aborted meanwhile
                if token == NOT_FINITE:
                    finished.append(self._fail_not_finite(seq))
                    continue
                kept += 1
                out = self._add_token(seq, token)
                if out is not None:
                    finished.append(out)
        self._count_step(plan, t0, kept)
        for seq in plan.seqs:
            if seq.status is not SequenceStatus.FINISHED and seq.params.stream:
                self._stream(seq)
        return finished

    def _fail_not_finite(self, seq: Sequence) -> RequestOutput:
        """End a request whose logits hold NaN or infinity (an adapter whose products overflow
        the serving dtype): finish_reason "error" with the reason; the other rows go on."""
        req = seq.lora_request
        who = "the base model" if req is None else f"adapter {req.lora_name!r}"
        dtype = str(self.dtype).removeprefix("torch.")
        seq.error = (f"{who} produced NaN or infinite logits at output token "
                     f"{len(seq.output_token_ids) + 1}: its activations overflow {dtype}; "
                     "the request was stopped (fix or retrain the adapter: scale its weights "
                     "or lora_alpha down)")
        self._seqs.pop(seq.request_id, None)
        self.scheduler.finish(seq)
        return self._finish(seq, "error")

    def _roll_back(self, plan) -> None:
        """A prefill step failed before its keys were written: the blocks it registered hold
        nothing, and sequences that hit them count them computed. Forget those digests and
        requeue every sequence of the step to prefill again from its start (a mixed step's
        decode rows just step again: their one slot is rewritten)."""
        for s in plan.prefilled:
            self.scheduler.blocks.unregister_uncomputed(s)
        for s in plan.prefilled:
            if s.status is SequenceStatus.RUNNING:
                self.scheduler.preempt(s, count=False)

    def _slots(self, plan, now: float) -> list[int]:
        """The GPU LoRA slot of each sequence of the step (-1: none), its adapter copied in
        (and the next waiters' adapters prefetched) before the step runs."""
        slots, new = [], {}
        if self.loras is not None:
            # the step's adapters not resident yet, largest first: the scheduler's planner
            # admitted them for that order (engine.lora.slot_pages.RowPlanner)
            gpu = self.loras.gpu
            new = {s.lora_id: s.lora_request for s in plan.seqs
                   if s.lora_request is not None and gpu.lookup(s.lora_id) is None}
            for lid in gpu.placement_order(new):
                self.loras.activate(new[lid], self.scheduler.running_adapters())
        for s in plan.seqs:
            first = plan.prefill and s.metrics.first_scheduled_time is None
            if first:
                s.metrics.first_scheduled_time = now
            if s.lora_request is None:
                slots.append(-1)
            else:
                slot = self.loras.gpu.lookup(s.lora_id)
                if slot is None or (first and s.lora_id not in new):
                    # first use: a hit makes it most recent, a miss writes it into a slot
                    slot = self.loras.activate(s.lora_request, self.scheduler.running_adapters())
                slots.append(slot)
        if self.loras is not None:
            self._prefetch_slots(plan.seqs)
            self.loras.gpu.wait_for(slots)
        return slots

    def _count_step(self, plan, t0: float, tokens: int | None = None) -> None:
        """Per-phase step counts and wall time (sampling has synchronised the device).
        ``tokens``: a round's tokens kept (rows that ended inside it compute more)."""
        kind = self._steps["prefill" if plan.prefill else "decode"]
        kind["steps"] += plan.steps
        kind["seconds"] += time.time() - t0
        rows = len(plan.decoded)
        # tokens decoded: prefill, by the decode rows of mixed steps
        kind["rows"] += rows * plan.steps if tokens is None else tokens
        if plan.steps > 1:
            kind["rounds"] += 1
        if plan.prefill:
            kind["tokens"] += sum(plan.chunks)
            kind["mixed"] += rows > 0
        if self.loras is not None:
            lids = {s.lora_id for s in plan.seqs if s.lora_id is not None}
            rank = self.loras.gpu.rank_of
            kind["adapters"] += len(lids) * plan.steps
            kind["lora_ranks"] += sum(rank.get(lid, 0) for lid in lids) * plan.steps
        decode = self._steps["decode"]
        decode["max_batch"] = max(decode["max_batch"], rows)

    def _adapter_ready(self, seq: Sequence) -> bool:
        """The sequence's adapter is in a GPU slot or the CPU cache (else: load it meanwhile)."""
        req = seq.lora_request
        if req is None or self.loras.ready(req):
            return True
        self.loras.prefetch(req)  # evicted from the CPU cache since add_request: load again
        return False

    def _prefetch_slots(self, step_seqs: list[Sequence], limit: int = 2) -> None:
        """Copy the adapters of the next waiting sequences into free (or idle) GPU slots now,
        on the side stream, so that their prefill does not wait for the copy."""
        gpu = self.loras.gpu
        protected = self.scheduler.running_adapters() | {s.lora_id for s in step_seqs}
        if not gpu.has_room(protected):
            return   # every slot is running or pinned (and protecting more frees none)
        # protecting more adapters never makes room: once a block of n pages has none, no
        # later waiter's block of n pages or more has any (one check per size, not per waiter)
        refused = None
        for seq in self.scheduler.waiting:
            if limit == 0:
                return
            req = seq.lora_request
            if req is None or seq.lora_id in protected:
                continue
            protected.add(seq.lora_id)  # later waiters never evict an earlier one's adapter
            if gpu.lookup(seq.lora_id) is not None or self.loras.cpu.peek(req) is None:
                continue
            pages = gpu.pages_for(seq.lora_id)
            if refused is not None and pages >= refused:
                continue
            if not gpu.has_room(protected - {seq.lora_id}, seq.lora_id):
                refused = pages
                if pages == 1:
                    return   # not even the smallest block
                continue
            self.loras.activate(req, protected)
            limit -= 1

    def _poll_adapters(self) -> list[RequestOutput]:
        """Fail the waiting requests whose adapter failed to load in the background."""
        if self.loras is None:
            return []
        outs = []
        for req, err in self.loras.poll():
            for seq in list(self.scheduler.waiting):
                if seq.lora_request is not None and seq.lora_id == req.lora_int_id \
                        and (seq.lora_request.lora_path, seq.lora_request.revision) == \
                        (req.lora_path, req.revision):
                    seq.error = f"adapter {req.lora_name!r} cannot be loaded: {err}"
                    if seq.request_id in self._generating:
                        self._load_errors[seq.request_id] = err
                    self._seqs.pop(seq.request_id, None)
                    self.scheduler.finish(seq)
                    outs.append(self._finish(seq, "error"))
        return outs

    def _append(self, seq: Sequence, token: int) -> str | None:
        """Add a sampled token; return a finish reason if the sequence is done."""
        p = seq.params
        seq.output_token_ids.append(token)
        if len(seq.output_token_ids) == 1:
            seq.metrics.first_token_time = time.time()
        if (not p.ignore_eos and token in self.tokenizer.eos_token_ids) or token in p.stop_token_ids:
            seq.text = self.tokenizer.decode(seq.output_token_ids[:-1])
            return "stop"
        if p.stop_list:
            text = self.tokenizer.decode(seq.output_token_ids)
            start = max(0, len(seq.text) - max(map(len, p.stop_list)))
            cut = find_stop(text, p.stop_list, start)
            seq.text = text
            if cut >= 0:
                seq.text = text[:cut]
                return "stop"
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _stream(self, seq: Sequence) -> None:
        """Hand the text that is final so far to ``on_tokens``. Held back: a trailing
        incomplete character (decoded as U+FFFD) and, with stop strings, the tail that could
        still begin one (the finished text is cut before a stop string)."""
        if self.on_tokens is None:
            return
        text = self.tokenizer.decode(seq.output_token_ids)
        end = len(text.rstrip("\ufffd"))
        if seq.params.stop_list:
            end -= max(map(len, seq.params.stop_list)) - 1
        if end > seq.streamed:
            self.on_tokens(seq.request_id, text[seq.streamed:end], None)
            seq.streamed = end

    def _finish(self, seq: Sequence, reason: str) -> RequestOutput:
        seq.finish_reason = reason
        if reason != "stop":  # "stop" already cut the text in _append
            seq.text = self.tokenizer.decode(seq.output_token_ids)
        seq.metrics.finished_time = time.time()
        if seq.params.stream and self.on_tokens is not None:
            self.on_tokens(seq.request_id, seq.text[seq.streamed:], reason)
            seq.streamed = len(seq.text)
        return self._output(seq)

    def _output(self, seq: Sequence) -> RequestOutput:
        done = seq.status is SequenceStatus.FINISHED
        logprobs = None
        if seq.logprobs is not None:
            if done:  # the tokens' texts, decoded once at the end
                for step in seq.logprobs:
                    for tid, lp in step.items():
                        if lp.decoded_token is None:
                            lp.decoded_token = self.tokenizer.token_text(tid)
            logprobs = list(seq.logprobs)
        return RequestOutput(seq.request_id, seq.prompt, list(seq.prompt_token_ids),
                             [CompletionOutput(0, seq.text, list(seq.output_token_ids),
                                               seq.finish_reason, logprobs)],
                             seq.lora_request, done, seq.metrics, error=seq.error,
                             num_cached_tokens=max(seq.num_cached_tokens, 0))

    def generate(self, prompts, sampling_params=None, lora_request=None, use_tqdm: bool = True,
                 *, order: str = "longest_first"):
        """Generate for every prompt; returns list[RequestOutput] in input order.

        ``order``: the order the requests are submitted in. "longest_first" (default): by
        ``max_tokens``, longest first, ties in input order (``longest_first``), so the batch
        does not end on a few long rows; "input": as given (first come, first served)."""
        if order not in GENERATE_ORDERS:
            raise ValueError(f"order must be one of {GENERATE_ORDERS}, got {order!r}")
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and
                                              isinstance(prompts[0], (int, dict)))
        prompts = [prompts] if single else list(prompts)
        n = len(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * n
        loras = lora_request if isinstance(lora_request, list) else [lora_request] * n
        if len(params) != n or len(loras) != n:
            raise ValueError(f"got {n} prompts, {len(params)} sampling params and {len(loras)} "
                             "lora requests; lists must have one entry per prompt")
        ids = []
        held = self._seqs.keys() | {o.request_id for o in self._finished_aside}
        while len(ids) < n:
            rid = f"gen-{next(self._ids)}"
            if rid not in held:  # a request of that name added through add_request
                ids.append(rid)
        default = SamplingParams.max_tokens    # the dataclass default, for params None
        submit = range(n) if order == "input" else longest_first(
            [default if sp is None else sp.max_tokens for sp in params])
        try:
            for i in submit:
                self.add_request(ids[i], prompts[i], params[i], loras[i])
        except Exception:
            for rid in ids:  # a refused prompt leaves nothing of this call queued
                seq = self._seqs.pop(rid, None)
                if seq is not None:
                    self.scheduler.finish(seq)
            raise
        results: dict[str, RequestOutput] = {}
        wanted = set(ids)
        self._generating |= wanted
        try:
            return self._generate_loop(ids, wanted, results, n, use_tqdm)
        except BaseException:
            for rid in wanted - results.keys():  # a failed call leaves none of its requests
                self.abort_request(rid)
            raise
        finally:
            self._generating -= wanted
            for rid in ids:
                self._load_errors.pop(rid, None)
                self._aborted.pop(rid, None)

    def _generate_loop(self, ids, wanted, results, n, use_tqdm):
        from tqdm.auto import tqdm

        with tqdm(total=n, desc="generate", unit="req", disable=not use_tqdm) as bar:
            while wanted - results.keys():
                outs = self.step() + [self._aborted.pop(r) for r in wanted if r in self._aborted]
                # add_request's: the next step() hands them over (parked first, whatever
                # this call raises below)
                self._finished_aside += [o for o in outs if o.request_id not in wanted]
                for out in (o for o in outs if o.request_id in wanted):
                    err = self._load_errors.pop(out.request_id, None)
                    if err is not None:  # generate() raises its adapter's load error
                        for rid in wanted - results.keys():
                            self.abort_request(rid)
                        raise err
                    results[out.request_id] = out
                    bar.update(1)
        return [results[r] for r in ids]

    # ---- adapters -------------------------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> None:
        """Validate an adapter and load it into the CPU cache (raises LoRAError)."""
        self._check_lora_usable(lora_request)
        self.loras.add(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        in_use = [s.request_id for s in self._seqs.values() if s.lora_id == lora_int_id]
        if in_use:
            raise LoRAError(f"adapter {lora_int_id} is used by unfinished requests {in_use[:5]}")
        return bool(self.loras and self._drop_adapter(lora_int_id))

    def pin_lora(self, lora_int_id: int) -> bool:
        if self.loras is None:
            raise LoRAError("pin_lora needs enable_lora=True")
        self.loras.pin(lora_int_id, self.scheduler.running_adapters())
        return True

    def unpin_lora(self, lora_int_id: int) -> bool:
        return bool(self.loras and self.loras.unpin(lora_int_id))

    def list_loras(self) -> dict:
        if self.loras is None:
            return {"gpu": [], "cpu": [], "pinned": []}
        return {"gpu": self.loras.gpu.ids(), "cpu": self.loras.cpu.ids(),
                "pinned": sorted(self.loras.gpu.pinned)}

    def capture_graphs(self) -> int:
        """Capture the CUDA decode graph of every batch-size bucket now (without adapters, and
        for the LoRA layers of the adapters resident now), so that no step captures one
        mid-run; returns how many were captured (0 without graphs: CPU, enforce_eager).
        Bulk warm-ups call it after their first requests; a service may call it once its
        adapters are pinned. Call between steps, not from inside one."""
        graphs = self.runner.graphs
        if graphs is None:
            return 0
        with self.runner.graph_lock:
            return graphs.capture_all()

    def compile_kernels(self, use_tqdm: bool = True) -> dict:
        """Compile now every kernel variant a step can pick, so that none compiles mid-run:
        one eager step of each LoRA launch plan and each decode-attention launch a step
        of this engine's limits can take (``engine.warmup``), on placeholder rows whose keys
        and values go to the null KV block (no sequence, slot or other block is touched;
        the lazily captured LoRA decode graphs are capture_graphs' part). Triton keeps what it compiles on disk, so a
        later process on the same machine finds it there (seconds, not minutes). Returns
        {"steps": probes run, "seconds": their time, "by": probes per reason}; does nothing
        off CUDA (the CPU runs no compiled kernel) unless the LoRA backend is Triton's
        (the interpreter, for tests). Call between steps, with ``capture_graphs``."""
        from lorry.engine import warmup
        if self.device.type != "cuda" and getattr(self.runner.ops, "launch_key", None) is None:
            return {"steps": 0, "seconds": 0.0, "by": {}}
        c = self.config
        lim = warmup.Limits(
            max_tokens=min(self.scheduler.max_num_batched_tokens,
                           c.max_num_seqs * self.max_model_len),
            max_rows=c.max_num_seqs, max_len=self.max_model_len, block_size=c.block_size,
            max_loras=self.runner.max_loras)
        steps = warmup.probes(self.model, self.runner, lim)
        by: dict[str, int] = {}
        for p in steps:
            by[p.why] = by.get(p.why, 0) + 1
        from tqdm.auto import tqdm
        hook, self.runner.logits_hook = self.runner.logits_hook, None
        try:
            with tqdm(total=len(steps), desc="compile kernels", unit="step",
                      disable=not use_tqdm) as bar:
                seconds = warmup.run_probes(self.model, self.runner, lim, steps,
                                            lambda done, total: bar.update(1))
        finally:
            self.runner.logits_hook = hook
        return {"steps": len(steps), "seconds": round(seconds, 3), "by": by}

    def cache_stats(self) -> dict:
        stats = self.loras.stats() if self.loras else {"gpu": {}, "cpu": {}}
        stats["running"] = len(self.scheduler.running)
        stats["waiting"] = len(self.scheduler.waiting)
        stats["base_weights"] = dict(getattr(self.model, "quant_report", None) or {})
        stats["kv"] = {**self.scheduler.blocks.stats(),
                       "preemptions": self.scheduler.preemptions,
                       "peak_running": self.scheduler.peak_running,
                       # decode plans made while new prompts were held (prefill_min_tokens)
                       "held_rounds": self.scheduler.held_rounds}
        stats["steps"] = {k: dict(v) for k, v in self._steps.items()}
        return stats

    def info(self) -> dict:
        c = self.config
        q = getattr(self.model, "quant_report", None) or {}
        return {"model": c.model, "model_dir": str(self.model_dir),
                "model_type": self.hf_config.model_type, "dtype": str(self.dtype).split(".")[-1],
                "device": str(self.device), "lora_backend": self.lora_backend,
                "enable_lora": c.enable_lora, "max_loras": c.max_loras,
                "max_lora_rank": c.max_lora_rank, "max_cpu_loras": c.max_cpu_loras,
                "lora_memory_slots": c.lora_memory_slots or c.max_loras,
                "max_num_seqs": c.max_num_seqs, "max_model_len": self.max_model_len,
                "block_size": c.block_size, "kv_blocks": self.scheduler.blocks.usable(),
                "kv_cache_dtype": str(self.model.kv_dtype).split(".")[-1],
                "enable_prefix_caching": c.enable_prefix_caching,
                # the scheduler's prompt hold as resolved (None in the config: by device)
                "prefill_min_tokens": self.scheduler.prefill_min_tokens,
                "prefill_max_wait": self.scheduler.prefill_max_wait,
                "num_layers": self.hf_config.num_hidden_layers,
                # quantization method (None, or detected from a GPTQ/AWQ checkpoint), base
                # weight bytes resident, and what they would take unquantized
                "quantization": q.get("method"), "base_weight_bytes": q.get("base_weight_bytes"),
                "base_weight_bytes_unquantized": q.get("base_weight_bytes_unquantized")}

    @torch.inference_mode()
    def compute_logits(self, prompt_token_ids: list[list[int]],
                       lora_request: list[LoRARequest | None] | None = None) -> list[torch.Tensor]:
        """Logits [len, V] of every position of each token-id prompt (scoring; no KV cache)."""
        loras = lora_request or [None] * len(prompt_token_ids)
        slots = []
        for lr in loras:
            if lr is not None:
                self.add_lora(lr)
                slots.append(self.loras.activate(lr, self.scheduler.running_adapters()
                                                 | {x.lora_int_id for x in loras if x}))
            else:
                slots.append(-1)
        if self.loras is not None:
            self.loras.gpu.wait_for(slots)
        logits = self.runner.forward_prompts(prompt_token_ids, slots, None, all_logits=True)
        if self.loras is not None:  # a later swap into these slots waits for this forward
            self.loras.gpu.mark_used(slots)
        return [logits[i, :len(p)] for i, p in enumerate(prompt_token_ids)]
