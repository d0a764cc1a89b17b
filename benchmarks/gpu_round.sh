#!/usr/bin/env bash
# The GPU checks and figures of docs/BENCHMARKS.md, in steps that each fit a short lease.
#   benchmarks/gpu_round.sh OUTDIR STEP [STEP ...]
# Steps: tests | throughput | throughputN (num_scheduler_steps N; THROUGHPUT_ARGS adds
# throughput.py options) | prefill (one mixed prefill
# step of the bulk workload: benchmarks/prefill_step.py, its timeline summed by trace_gaps.py)
# | decode (a decode round of it: the same script's --decode; DECODE_ARGS its options) | lora_bulk (the LoRA of a
# bulk decode and prompt step per decode-table setting: lora_bulk_step.py; LORA_CONFIGS)
# | lora_sweep (the same over a grid of settings, the best last) | lora_prompt (the prompt
# step's LoRA over lora_bulk_step.py's PROMPT_SWEEP: two-launch table and decode-path settings)
# | lora_cross (4,096-token prompts of 1-32 adapters on both paths: lora_bulk_step --crossing)
# | loop (40 whole engine steps traced: --loop; LOOP_AT: after which steps, LOOP_RUN: bulk.py's
# run, LOOP_CPROFILE: that many more steps under cProfile, LOOP_ARGS: prefill_step.py options
# such as --kv-cache-dtype fp8; PREFILL_ARGS the same for prefill) | attn_sweep
# (prefill_attn_sweep.py; ATTN_ARGS its options, ATTN_NAME a suffix of its files) | launch (launch_overhead.py) | sweep (or its halves sweep_batch,
# sweep_adapters) | overhead (a compile run, then mixed cold, mixed --preload-adapters and
# no_adapters, each its own process: the LoRA overhead A/B) | loads (the cold loads' cost: cold
# at the 1 ms and 5 ms GIL intervals, preloaded, no adapters; LOADS_RUNS picks, also
# cold_thread, cold_process, cold_noreserve, cold_register, cold_reserve, cold_pageable;
# LOADS_SKIP_COMPILE skips the compile run) | decode_sweep (decode_attn_sweep.py alone;
# DSWEEP_ARGS its options) | decode_split (decode_attn_sweep.py, then the
# bulk workload with its best splits against the default) | pinned (benchmarks/pinned_alloc.py) | pack (last: OUTDIR's files in one
# round.tgz) | fp8_tests (the fp8 KV cache and fp8 linear tests on CUDA) | fp8_step
# (decode_step.py at FP8_BATCH rows, default 256: bf16, fp8 KV, fp8 weights, both; each a
# process with its kernel table) | fp8_bulk (a compile run of each, then the bulk workload's
# FP8_RUNS, default mixed, under bf16 / fp8 KV / fp8 KV + fp8 weights, each a process;
# FP8_ENGINES picks: name:flags, flags comma-separated)
# | a bulk.py run name (each its own process; BULK_ARGS adds bulk.py options).
# Every step has its own time limit and writes OUTDIR/<step>.json/.log, so a step cut short
# leaves the ones before it. Run from the repository root on the GPU machine.
set -u
out=${1:?OUTDIR}; shift
mkdir -p "$out"
export PYTHONPATH=$PWD
py=${PYTHON:-python3}
limit=${STEP_LIMIT:-280}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null

summary() {  # the [bulk] lines and the derived figures of one log/json
    grep -h '^\[bulk\]' "$1.log" 2>/dev/null
    [ -s "$1.json" ] && $py -c 'import json,sys; r=json.load(open(sys.argv[1]))
print({k: r[k] for k in ("lora_overhead","prefix_speedup","order_speedup","mixed_steps_speedup","multi_step_speedup","grouping_speedup","batch") if k in r})
for name, run in r.get("runs", {}).items():
    print(name, "warm-up s", run.get("warmup_seconds"), "compile_kernels", run.get("compile_kernels"))
    p = run.get("step_profile") or {}
    pb = dict(p.get("prompt_bearing") or {}); w = pb.pop("worst", [])
    print(name, "prompt-bearing", pb); [print("  worst", x) for x in w[:5]]
    print(name, "decode", p.get("decode"))' "$1.json"
}

while [ $# -gt 0 ]; do
    step=$1; shift
    case $step in
    tests)
        timeout "$limit" $py -m pytest -q -p no:cacheprovider -W default \
            tests/unit/engine/test_engine_paged_kv.py tests/unit/engine/test_engine_bases_cuda.py \
            tests/unit/engine/test_engine_chunked_async_cuda.py tests/unit/engine/test_engine_cuda.py \
            tests/kernels/test_engine_triton.py tests/kernels/test_fused_model.py \
            tests/kernels/test_prefill_attention.py tests/unit/engine/test_engine_multi_step.py \
            tests/kernels/test_triton_lora.py tests/kernels/test_slot_rows.py \
            > "$out/tests.log" 2>&1
        echo "tests rc=$?"; tail -3 "$out/tests.log" ;;
    throughput*)
        n=${step#throughput}
        timeout "$limit" $py benchmarks/throughput.py --device cuda --preset llama3-8b --quick \
            --more-adapters ${n:+--num-scheduler-steps $n} ${THROUGHPUT_ARGS:-} \
            > "$out/$step.json" 2> "$out/$step.log"
        echo "$step rc=$?"; grep -E 'tok_per_s|overhead' "$out/$step.json" | head -12 ;;
    prefill)
        timeout "$limit" $py benchmarks/prefill_step.py --skip 150 --min-tokens 1024 \
            --requests 1000 ${PREFILL_ARGS:-} --trace "$out/prefill_trace.json" --out "$out/prefill.json" \
            > /dev/null 2> "$out/prefill.log"
        echo "prefill rc=$?"; [ -s "$out/prefill.json" ] && $py -c 'import json,sys
r=json.load(open(sys.argv[1])); print({k: v for k, v in r.items() if k not in ("kernels", "host_ops")})' "$out/prefill.json"
        [ -s "$out/prefill_trace.json" ] && $py benchmarks/trace_gaps.py "$out/prefill_trace.json" \
            > "$out/prefill_gaps.json" && cat "$out/prefill_gaps.json" ;;
    decode)
        timeout "$limit" $py benchmarks/prefill_step.py --decode --skip 150 --requests 2000 --min-rows 96 ${DECODE_ARGS:-} \
            --trace "$out/decode_trace.json" --out "$out/decode.json" > /dev/null 2> "$out/decode.log"
        echo "decode rc=$?"; [ -s "$out/decode.json" ] && $py -c 'import json,sys
r=json.load(open(sys.argv[1])); print({k: v for k, v in r.items() if k != "kernels"}); [print(k) for k in r.get("kernels", [])[:12]]' "$out/decode.json"
        [ -s "$out/decode_trace.json" ] && $py benchmarks/trace_gaps.py "$out/decode_trace.json" \
            > "$out/decode_gaps.json" && cat "$out/decode_gaps.json" ;;
    loop)   # the engine's own loop: 40 whole steps in the prompt-heavy part, then 40 later
        for at in ${LOOP_AT:-60 600}; do
            f=$out/loop${LOOP_RUN:-}$at
            timeout "$limit" $py benchmarks/prefill_step.py --loop 40 --skip $at --requests 2000 \
                --run ${LOOP_RUN:-mixed} --cprofile ${LOOP_CPROFILE:-0} ${LOOP_ARGS:-} --out "$f.json" \
                > /dev/null 2> "$f.log"
            echo "loop ${LOOP_RUN:-mixed} at step $at rc=$?"; [ -s "$f.json" ] && $py -c 'import json,sys
r=json.load(open(sys.argv[1])); t=r.get("timeline", {}); print(r.get("untraced"), r.get("traced"), {k: t.get(k) for k in ("span_ms","busy_ms","idle_ms","idle_share","idle_ms_by_gap_size")}); [print(x) for x in t.get("largest_gaps", [])[:8]]
print({k: v for k, v in r.items() if k.startswith("adapter_loads")})
c=r.get("cprofile"); c and print("cprofile", c["steps"], "steps", c["wall_ms"], "ms"); [print(x) for x in (c or {}).get("by_cumtime", [])[:25]]' "$f.json"
        done ;;
    attn_sweep)
        f=$out/attn_sweep${ATTN_NAME:-}
        timeout "$limit" $py benchmarks/prefill_attn_sweep.py ${ATTN_ARGS:-} > "$f.json" 2> "$f.log"
        echo "attn_sweep ${ATTN_ARGS:-} rc=$?"; $py -c 'import json,sys; r=json.load(open(sys.argv[1]))
print("default", r["default"]); print("best", r["best"], r["speedup"])
for p in (1, 2, 4, 8):
    ok = [x for x in r["results"] if x.get("max_pack") == p and "ms" in x]
    ok and print("best at max_pack", p, min(ok, key=lambda x: x["ms"]))' "$f.json" ;;
    lora_bulk)   # the LoRA of a bulk decode and prompt step per decode-table setting
        timeout "$limit" $py benchmarks/lora_bulk_step.py \
            --configs ${LORA_CONFIGS:-default rows=8 rows=16 rows=16,programs_per_sm=6 off} \
            > "$out/lora_bulk.json" 2> "$out/lora_bulk.log"
        echo "lora_bulk rc=$?"; cat "$out/lora_bulk.json" ;;
    lora_sweep)  # the decode table's launch settings over the bulk decode step (SWEEP)
        timeout "$limit" $py benchmarks/lora_bulk_step.py --sweep --kinds decode \
            --max-seconds $((limit - 60)) > "$out/lora_sweep.json" 2> "$out/lora_sweep.log"
        echo "lora_sweep rc=$?"; tail -1 "$out/lora_sweep.json" ;;
    lora_prompt)  # the bulk prompt step's LoRA over PROMPT_SWEEP's settings
        timeout "$limit" $py benchmarks/lora_bulk_step.py --prompt-sweep \
            --max-seconds $((limit - 60)) > "$out/lora_prompt.json" 2> "$out/lora_prompt.log"
        echo "lora_prompt rc=$?"; $py -c 'import json,sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "us" in r: print(r["proj"], r["config"], r["path"], r["us"], r.get("same_as", ""))
    elif "step_lora_ms" in r: print(r)' "$out/lora_prompt.json" ;;
    lora_cross)  # 4,096-token prompts of 1-32 adapters: long tiles against two-launch
        timeout "$limit" $py benchmarks/lora_bulk_step.py --crossing \
            --max-seconds $((limit - 60)) > "$out/lora_cross.json" 2> "$out/lora_cross.log"
        echo "lora_cross rc=$?"; grep step_lora_ms "$out/lora_cross.json" ;;
    launch)
        timeout "$limit" $py benchmarks/launch_overhead.py > "$out/launch.json" 2> "$out/launch.log"
        echo "launch rc=$?"; cat "$out/launch.json" ;;
    sweep|sweep_batch|sweep_adapters)   # the plot: bulk.py --plot-from sweep*.json
        case $step in
        sweep) what="--sweep-batch 64 128 256 512 --sweep-adapters 1 8 32 200" ;;
        sweep_batch) what="--sweep-batch 64 128 256 512" ;;
        *) what="--sweep-adapters 1 8 32 200" ;;
        esac
        timeout "$limit" $py benchmarks/bulk.py --device cuda --runs --requests "${SWEEP_REQUESTS:-500}" \
            $what ${BULK_ARGS:-} --out "$out/$step.json" > /dev/null 2> "$out/$step.log"
        echo "$step rc=$?"; summary "$out/$step" ;;
    overhead)   # the LoRA overhead A/B in one go: a short run first pays the kernel compiles,
        # then mixed with cold adapters, mixed with them preloaded, no adapters, each a process
        timeout "$limit" $py benchmarks/bulk.py --device cuda --runs mixed --requests 300 \
            --out "$out/compile.json" > /dev/null 2> "$out/compile.log"
        echo "compile run rc=$?"
        for what in cold:mixed: preloaded:mixed:--preload-adapters base:no_adapters:; do
            IFS=: read -r name run extra <<< "$what"
            timeout "$limit" $py benchmarks/bulk.py --device cuda --runs $run --warmup 64 $extra \
                ${BULK_ARGS:-} --out "$out/overhead_$name.json" > /dev/null 2> "$out/overhead_$name.log"
            echo "overhead $name rc=$?"; summary "$out/overhead_$name"
        done ;;
    loads)   # what cold adapter loads cost: a 150-request run for the compiles, then each of
        # LOADS_RUNS (default: cold at the engine's 1 ms GIL interval and at Python's 5 ms, the
        # adapters preloaded, no adapters; also cold_thread / cold_process: loads read in a
        # thread / in the loader process (EngineConfig.lora_load_process); cold_noreserve: no
        # pinned segment reserved (EngineConfig.pinned_reserve_mb 0); cold_register: pinned
        # staging through cudaHostRegister, cold_reserve: from one pinned segment reserved at
        # start (RESERVE_MB), cold_pageable: plain host memory), each a process
        [ -n "${LOADS_SKIP_COMPILE:-}" ] || { timeout "$limit" $py benchmarks/bulk.py --device cuda \
            --runs mixed --requests 150 --out "$out/compile.json" > /dev/null 2> "$out/compile.log"
            echo "compile run rc=$?"; }
        for name in ${LOADS_RUNS:-cold cold5ms preloaded base}; do
            run=mixed extra= conf=${PYTORCH_CUDA_ALLOC_CONF:-}
            case $name in
            cold5ms) extra=--load-switch-interval=0.005 ;;
            cold_thread) extra="--lora-load-process off" ;;
            cold_noreserve) extra="--pinned-reserve-mb 0" ;;
            cold_process) extra="--lora-load-process on" ;;
            cold_register) conf=pinned_use_cuda_host_register:True,pinned_num_register_threads:8 ;;
            cold_reserve) conf=pinned_reserve_segment_size_mb:${RESERVE_MB:-16384} ;;
            cold_pageable) extra=--pageable-staging ;;
            preloaded) extra=--preload-adapters ;;
            base) run=no_adapters ;;
            esac
            PYTORCH_CUDA_ALLOC_CONF=$conf timeout "$limit" $py benchmarks/bulk.py --device cuda \
                --runs $run --warmup 64 $extra ${BULK_ARGS:-} --out "$out/loads_$name.json" \
                > /dev/null 2> "$out/loads_$name.log"
            echo "loads $name rc=$?"; summary "$out/loads_$name"
            [ -s "$out/loads_$name.json" ] && $py -c 'import json,sys; r=json.load(open(sys.argv[1]))
r=r["runs"][next(iter(r["runs"]))]; print(r.get("lora_cache"), r.get("host_pinned"), (r.get("steps") or {}).get("load_wait"))' "$out/loads_$name.json"
        done ;;
    decode_sweep)   # the decode attention's launch settings at a bulk decode step alone
        # (decode_attn_sweep.py; DSWEEP_ARGS its options, e.g. --quick --kv-cache-dtype fp8)
        f=$out/decode_sweep${DSWEEP_NAME:-}
        timeout "$limit" $py benchmarks/decode_attn_sweep.py ${DSWEEP_ARGS:-} > "$f.json" 2> "$f.log"
        echo "decode_sweep ${DSWEEP_ARGS:-} rc=$?"; $py -c 'import json,sys; r=json.load(open(sys.argv[1]))
print({k: r.get(k) for k in ("gpu", "keys", "kv_cache_dtype", "kv_gb_per_step", "wide_cache_default_ms", "default", "best", "speedup")})
[print(x) for x in r["top"][:6]]' "$f.json" ;;
    decode_split)   # the decode attention's launch settings at a bulk decode step
        # (decode_attn_sweep.py), then the bulk workload (SPLIT_REQUESTS, default 600) with the
        # best sweep's splits as decode_attention.SPLIT_KEYS against the default, each a
        # process, the default twice around it (the first also pays the compiles)
        timeout "$limit" $py benchmarks/decode_attn_sweep.py > "$out/decode_attn_sweep.json" \
            2> "$out/decode_attn_sweep.log"
        echo "decode_attn_sweep rc=$?"
        keys=$($py -c 'import json,sys; r=json.load(open(sys.argv[1]))
print({k: r[k] for k in ("gpu", "keys", "kv_gb_per_step", "default", "best", "speedup",
                         "best_splits_at_default_launch")}, file=sys.stderr)
[print(x, file=sys.stderr) for x in r["top"]]
b = r["best_splits_at_default_launch"]; print(r["table_keys"] // b["splits"] if b and b["splits"] > 1 else 0)' \
            "$out/decode_attn_sweep.json") || keys=0
        echo "split keys from the sweep: $keys"
        for name in split_default split_$keys split_default2; do
            extra=; case $name in split_default*) ;; *) extra="--decode-split-keys $keys" ;; esac
            [ "$name" = split_0 ] && continue
            timeout "$limit" $py benchmarks/bulk.py --device cuda --runs mixed --warmup 64 \
                --requests ${SPLIT_REQUESTS:-600} $extra --out "$out/$name.json" \
                > /dev/null 2> "$out/$name.log"
            echo "$name rc=$?"; summary "$out/$name"
        done ;;
    pinned)   # what pinned host allocations cost a thread launching kernels, per setting
        timeout "$limit" $py benchmarks/pinned_alloc.py > "$out/pinned.json" 2> "$out/pinned.log"
        echo "pinned rc=$?"; cat "$out/pinned.log" ;;
    pack)   # last: every file of OUTDIR in OUTDIR/round.tgz (the device tool returns 8 files)
        # (written beside OUTDIR first: a tar written into the folder it reads fails with
        # "file changed as we read it", and the files stayed unpacked)
        t=$(mktemp /tmp/round.XXXXXX.tgz)
        (cd "$out" && tar czf "$t" --exclude round.tgz . && find . -type f -delete) \
            && mv "$t" "$out/round.tgz"
        echo "pack: $(du -h "$out/round.tgz" | cut -f1)" ;;
    fp8_tests)
        timeout "$limit" $py -m pytest -q -p no:cacheprovider -W default -k fp8 \
            tests/kernels/test_fused_ops.py tests/kernels/test_decode_attention.py \
            tests/kernels/test_prefill_attention.py tests/unit/engine/test_engine_fp8_kv.py \
            tests/unit/quant/test_fp8.py tests/kernels/test_fp8_matmul.py \
            > "$out/fp8_tests.log" 2>&1
        echo "fp8_tests rc=$?"; tail -5 "$out/fp8_tests.log" ;;
    fp8_step)
        for what in ${FP8_STEPS:-bf16: kv:--kv-cache-dtype=fp8 w:--quantization=fp8 \
                kvw:--kv-cache-dtype=fp8,--quantization=fp8}; do
            name=${what%%:*}; flags=${what#*:}
            timeout "$limit" $py benchmarks/decode_step.py --batch "${FP8_BATCH:-256}" \
                --variants triton ${flags//,/ } --profile "$out/fp8_step_$name.txt" \
                --out "$out/fp8_step_$name.json" > /dev/null 2> "$out/fp8_step_$name.log"
            echo "fp8_step $name rc=$?"; [ -s "$out/fp8_step_$name.json" ] && $py -c '
import json,sys; r=json.load(open(sys.argv[1])); print(r["step_ms"])
print({k: v for k, v in r.get("kernels", {}).items() if "gemm" in k or "attention" in k})' \
                "$out/fp8_step_$name.json"
        done ;;
    fp8_bulk)
        for what in ${FP8_ENGINES:-bf16: kv:--kv-cache-dtype=fp8 kvw:--kv-cache-dtype=fp8,--quantization=fp8}; do
            name=${what%%:*}; flags=${what#*:}; flags=${flags//,/ }
            [ -n "${FP8_SKIP_COMPILE:-}" ] || { timeout "$limit" $py benchmarks/bulk.py \
                --device cuda --runs mixed --requests 150 $flags --out "$out/compile_$name.json" \
                > /dev/null 2> "$out/compile_$name.log"; echo "compile $name rc=$?"; }
            for run in ${FP8_RUNS:-mixed}; do
                timeout "$limit" $py benchmarks/bulk.py --device cuda --runs $run --warmup 64 \
                    $flags ${BULK_ARGS:-} --out "$out/fp8_${name}_$run.json" > /dev/null \
                    2> "$out/fp8_${name}_$run.log"
                echo "fp8_bulk $name $run rc=$?"; summary "$out/fp8_${name}_$run"
            done
        done ;;
    *)  # a bulk.py run name
        timeout "$limit" $py benchmarks/bulk.py --device cuda --runs "$step" ${BULK_ARGS:-} \
            --out "$out/bulk_$step.json" > /dev/null 2> "$out/bulk_$step.log"
        echo "bulk $step rc=$?"; summary "$out/bulk_$step" ;;
    esac
done
