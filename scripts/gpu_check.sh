#!/usr/bin/env bash
# The GPU check: lcm-live's CUDA tests and `lcm-live bench` figures, in one short run on a lent GPU machine.
#
#   On the GPU machine, from the repo root, with $OUT set and .whl carried:   bash scripts/gpu_check.sh
#   (device tool: command "bash scripts/gpu_check.sh", carry [".whl", ".whl_cpu"], timeout_s 600 for the default
#   budget; scripts/device_wheels.sh makes both folders: 20 + 35 MB of the 64 MiB a call carries)
#   Which set: GPU_CHECK_SET=families (default: issue 17's fast families, roofline and live 512²) or issue5.
#   Some steps only: GPU_CHECK_ONLY="tests sd15_512_4steps" bash scripts/gpu_check.sh (the step names below)
#   Dry run here (CPU, tiny model, tiny sizes; every command line parses and runs):
#       GPU_CHECK_DRY=1 nice -n 19 env OMP_NUM_THREADS=1 bash scripts/gpu_check.sh
#
# Files that come back: $OUT/gpu.log (everything printed), $OUT/bench.json (every step's status and time, a
# summary of the figures, and each bench's full --json report) and $OUT/profile_*.json (torch.profiler traces of
# the two profiled compile steps, for ui.perfetto.dev). Each step runs under its own `timeout`, so one
# failure or hang never stops the rest; the steps share a budget (GPU_CHECK_BUDGET_S, default 540 s, counted
# from the start): each step's timeout is cut to what is left, and a step that would start with under 20 s left
# is skipped and says so. The script ends within the budget plus ~30 s (a kill's grace, the JSON merge).
# Order: the CUDA tests; the issue's figures (sd15 512² at 4 steps, the live studio, sdxl 1024², sd15 at 1 step);
# torch.compile at batch 1, 8 and 16 (compiling the UNet takes about a minute per shape) and in the live studio;
# SDXL nf4, the least needed, last. Beside them all, from the start, on 2 cores of their own: the CPU comparison on
# the host's AMX cores where it has them (OpenVINO from .whl_cpu; see cpu_amx below). The default
# budget does not reach the last few: a second call names them, e.g.
#   GPU_CHECK_ONLY="sd15_512_4steps_batch16_compile live_sd15_256_compile cpu_amx_sd15" bash scripts/gpu_check.sh
# The bitsandbytes sd15 figures and batching without compile were measured in the first GPU run
# (docs/benchmarks.md) and are not repeated.
#
# Times measured on an H200 host (16 cores), 2026-11-26: installing the wheels 1 s, imports 15 s, each sd15
# bench 20-35 s (the random-weight build of both paths and the imports are most of it; the timed runs are < 1 s
# each), the tests 45 s, an SDXL bench 35 s, live 41 s (15 s of drawing), each --compile bench 85-95 s (a
# shape Inductor has cached: 45 s); the whole default run 430 s, plus ~35 s to start the machine.

set -u
cd "$(dirname "$0")/.." || exit 1

DRY=${GPU_CHECK_DRY:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
MIN_STEP_S=20
OUT=${OUT:-$(mktemp -d /tmp/gpu_check_out.XXXXXX)}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
JSONDIR=$WORK/json
STATUS=$WORK/status.tsv
LOG=$OUT/gpu.log
mkdir -p "$OUT" "$JSONDIR"
: > "$STATUS"
: > "$LOG"

export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
CLI='import sys; from lcm_live.cli import main; sys.exit(main())'  # lcm_live.cli has no __main__ module

if [[ $DRY == 1 ]]; then
    PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
    export PYTHONPATH=$PWD/src
    DEVICE=cpu; SD15=tiny; SDXL=tiny; S512=64; S1024=64; S256=64; LIVE_SECONDS=3
    FAM_SDXL=tiny; FAM_LIVE_S=3
    R_FAST=(--runs 1 --warmup 0); R_SLOW=(--runs 1 --warmup 0)
    # the CPU stand-in: torch (no OpenVINO conversion); nf4 is CUDA-only: that step is expected to end with its
    # one-line error, status failed
    EXTRA=(--backend torch)
else
    PY=${PYTHON:-python3}
    DEVICE=cuda; SD15=sd15; SDXL=sdxl; S512=512; S1024=1024; S256=256; LIVE_SECONDS=15
    FAM_SDXL=sdxl-turbo; FAM_LIVE_S=10
    R_FAST=(--runs 5 --warmup 2); R_SLOW=(--runs 3 --warmup 1)
    EXTRA=()
fi

log() { echo "$*" | tee -a "$LOG"; }

START=$(date +%s)
PIN=()  # a `taskset -c CORES` prefix for every step's command (set when the AMX job has cores of its own)
SET=${GPU_CHECK_SET:-families}  # families: issue 17's table; issue5: the earlier figures
ONLY=${GPU_CHECK_ONLY:-}  # space-separated step names: run only those (install always runs)
# step NAME TIMEOUT_S COMMAND...: runs COMMAND under timeout (capped by what is left of the budget), logs it.
step() {
    local name=$1 limit=$2
    shift 2
    if [[ -n $ONLY && $name != install && " $ONLY " != *" $name "* ]]; then
        return 0
    fi
    local elapsed=$(( $(date +%s) - START ))
    local left=$(( BUDGET - elapsed ))
    if (( left < MIN_STEP_S )); then
        log "=== [$name] SKIPPED: ${elapsed}s of the ${BUDGET}s budget used"
        printf '%s\tskipped\t\t0\n' "$name" >> "$STATUS"
        return 0
    fi
    (( limit > left )) && limit=$left
    log "=== [$name] at ${elapsed}s, timeout ${limit}s: ${*//$CLI/<lcm-live>}"
    local t0
    t0=$(date +%s)
    timeout -k 15 "$limit" ${PIN[@]+"${PIN[@]}"} "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - t0 )) what=ok
    if (( rc == 124 || rc == 137 )); then what=timeout; elif (( rc != 0 )); then what=failed; fi
    log "=== [$name] $what (exit $rc) after ${took}s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$what" "$rc" "$took" >> "$STATUS"
}

# bench NAME TIMEOUT_S ARGS...: one `lcm-live bench` with its JSON report kept for the merge.
bench() {
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" "$PY" -c "$CLI" bench --device "$DEVICE" --no-progress --json "$JSONDIR/$name.json" \
        "$@" ${EXTRA[@]+"${EXTRA[@]}"}
}

# ---------------------------------------------------------------- the machine and the packages
log "=== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) dry=$DRY budget=${BUDGET}s out=$OUT"
timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
# The host CPU: issue 5's CPU floors were set on a 2-core Sapphire Rapids with AMX (see cpu_amx below).
log "host CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) | $(nproc) cores | $(grep -o -w -E \
    'amx_bf16|amx_int8|avx512_bf16|avx512_vnni' /proc/cpuinfo | sort -u | tr '\n' ' ')"
timeout 60 "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import sys
from importlib import metadata

import torch

print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}: {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, sm_{p.major}{p.minor}")
for name in ("transformers", "peft", "accelerate", "triton", "numpy", "huggingface_hub", "psutil"):
    try:
        print(f"  {name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"  {name} MISSING")
EOF

if [[ $DRY == 1 ]]; then
    log "=== [install] dry run: not installing .whl/*.whl (cp312 wheels for the GPU machine)"
else
    step install 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl $(ls .whl_cpu/*.whl 2>/dev/null)
    export PYTHONPATH=$PWD/src:/tmp/site:$PWD/.whl/bnb
fi
step imports 60 "$PY" -c '
from importlib import metadata
import diffusers, fastapi, uvicorn, websockets, pydantic, pydantic_settings  # noqa: F401
for name in ("diffusers", "fastapi", "starlette", "uvicorn", "websockets", "pydantic", "pydantic-settings", "peft",
             "bitsandbytes"):
    try:
        print(f"  {name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"  {name} MISSING")
try:
    import bitsandbytes
    print("  bitsandbytes imports:", bitsandbytes.__version__)
except Exception as exc:
    print("  bitsandbytes does not import:", type(exc).__name__, exc)
'

HELP=$("$PY" -c "$CLI" bench --help 2>/dev/null)
HAS_BATCH=0; [[ $HELP == *--batch-size* ]] && HAS_BATCH=1
HAS_PROFILE=0; [[ $HELP == *--profile* ]] && HAS_PROFILE=1
log "=== bench flags here: --batch-size $HAS_BATCH --profile $HAS_PROFILE"
# profile_arg NAME: "--profile $OUT/profile_NAME.json" where bench has the flag (an older checkout: nothing).
profile_arg() { (( HAS_PROFILE )) && echo "--profile $OUT/profile_$1.json"; }

# ---------------------------------------------------------------- issue 5's CPU floors, beside the GPU steps
# Where the host has AMX (the kind of CPU the floors were set on): the issue's CPU figures on 2 of its cores, the
# last two, while every GPU step runs on the others. OpenVINO (bf16, then NNCF int8 where the host has scipy, which
# .whl_cpu leaves out) where .whl_cpu was carried, else torch. Their log is $OUT/cpu_amx.log.
# GPU_CHECK_CPU_AMX=force runs them without AMX (a dry run's check of the commands), =skip never.
AMX=${GPU_CHECK_CPU_AMX:-auto}
AMX_PID=
if [[ $AMX == force || ( $AMX == auto && $(grep -c -w amx_bf16 /proc/cpuinfo) -gt 0 ) ]]; then
    NCPU=$(nproc)
    (
        LOG=$OUT/cpu_amx.log
        : > "$LOG"
        if (( NCPU >= 4 )); then PIN=(taskset -c "$((NCPU - 2)),$((NCPU - 1))"); fi
        export OMP_NUM_THREADS=2
        BACKEND=torch
        "$PY" -c 'import openvino' 2>/dev/null && BACKEND=openvino
        cpu_bench() {
            local name=$1 limit=$2
            shift 2
            step "$name" "$limit" "$PY" -c "$CLI" bench --device cpu --backend "$BACKEND" --arch "$SD15" \
                --no-progress --json "$JSONDIR/$name.json" "$@"
        }
        # The first OpenVINO run converts the UNet for its shape (minutes on 2 cores); int8 reuses that IR, the
        # live studio (256²) needs one of its own, so it goes last and may not fit the budget.
        cpu_bench cpu_amx_sd15 360 --width "$S512" --height "$S512" --num-inference-steps 4 --runs 2 --warmup 1
        if [[ $BACKEND == openvino ]] && "$PY" -c 'import nncf' >> "$LOG" 2>&1; then
            cpu_bench cpu_amx_sd15_int8 400 --width "$S512" --height "$S512" --num-inference-steps 4 \
                --quantize int8 --runs 2 --warmup 1
        else
            log "=== [cpu_amx_sd15_int8] not run: needs OpenVINO and NNCF (scipy) on this host"
        fi
        cpu_bench cpu_amx_live_256 240 --live --width "$S256" --height "$S256" --seconds "$LIVE_SECONDS"
    ) &
    AMX_PID=$!
    if (( NCPU >= 4 )); then PIN=(taskset -c "0-$((NCPU - 3))"); fi
    log "=== cpu_amx: started beside the GPU steps (log: cpu_amx.log); GPU steps on ${PIN[*]:-every core}"
fi

# ---------------------------------------------------------------- the steps, most needed first
# Diagnoses, only when GPU_CHECK_ONLY names them: where the tiny model on CUDA parts from the CPU reference (how
# the float16-noise difference of docs/benchmarks.md "GPU" was found).
if [[ " $ONLY " == *" tiny_parity "* || " $ONLY " == *" conv_parity "* ]]; then
    step tiny_parity 60 "$PY" scripts/gpu_tiny_parity.py --device "$DEVICE"
    step conv_parity 60 "$PY" scripts/gpu_conv_parity.py --device "$DEVICE"
fi

# The CUDA tests (skipped, with the reason, where there is no CUDA device).
step tests 150 "$PY" -m pytest -q -p no:cacheprovider -rA -m gpu tests/engine/test_cuda.py

# Issue 17's table on a GPU (GPU_CHECK_SET=families, the default): the default path's roofline on sd15, each fast
# family at 512² on its own steps, the live studio at 512² (one client: beside StreamDiffusion's published RTX 4090
# TensorRT figures, 106 fps 1-step text-to-image and 94 fps image-to-image, on sd-turbo), and feature reuse against
# the exact path in the live studio. sd-turbo is StreamDiffusion's model, so its compiled steps come first of the
# compiled ones; sdxs's last (the budget may not reach them).
if [[ $SET == families ]]; then
    bench sd15_512_4steps 90 --arch "$SD15" --width "$S512" --height "$S512" --num-inference-steps 4 "${R_FAST[@]}"
    bench fam_sdxs_512_1step 80 --arch sdxs --width "$S512" --height "$S512" --baseline none "${R_FAST[@]}"
    bench fam_sd_turbo_512_1step 80 --arch sd-turbo --width "$S512" --height "$S512" --baseline none "${R_FAST[@]}"
    bench fam_sdxl_turbo_512_1step 90 --arch "$FAM_SDXL" --width "$S512" --height "$S512" --baseline none \
        "${R_FAST[@]}"
    bench fam_bk_sdm_tiny_512_4steps 80 --arch bk-sdm-tiny --width "$S512" --height "$S512" --baseline none \
        "${R_FAST[@]}"
    bench live_sdxs_512 70 --live --arch sdxs --width "$S512" --height "$S512" --seconds "$FAM_LIVE_S"
    bench live_sd15_512 70 --live --arch "$SD15" --width "$S512" --height "$S512" --seconds "$FAM_LIVE_S"
    bench live_sd15_512_reuse4 70 --live --arch "$SD15" --width "$S512" --height "$S512" --seconds "$FAM_LIVE_S" \
        --feature-reuse 4
    bench fam_sd_turbo_512_1step_compile 150 --arch sd-turbo --width "$S512" --height "$S512" --baseline none \
        --compile "${R_FAST[@]}"
    bench live_sd_turbo_512_compile 150 --live --arch sd-turbo --width "$S512" --height "$S512" \
        --seconds "$FAM_LIVE_S" --compile
    bench fam_sdxs_512_1step_compile 150 --arch sdxs --width "$S512" --height "$S512" --baseline none --compile \
        "${R_FAST[@]}"
    bench live_sdxs_512_compile 150 --live --arch sdxs --width "$S512" --height "$S512" --seconds "$FAM_LIVE_S" \
        --compile
    # Typing over a sketch (the sketch's encoding kept, engine/init_latents.py), compiled: the Inductor cache of the
    # step above makes its compile short.
    bench live_sdxs_512_compile_typing 120 --live --arch sdxs --width "$S512" --height "$S512" \
        --seconds "$FAM_LIVE_S" --compile --typing
fi

# Issue 5's figures (GPU_CHECK_SET=issue5; measured on 2026-11-26):
if [[ $SET == issue5 ]]; then
# The issue's figures: the seed article's fp16 pipeline against lcm-live's default fast path (fp16, SDPA,
# channels_last, TAESD, cached prompt embeddings): sd15 512² at 4 and 1 steps, sdxl 1024² at 4, the live studio.
bench sd15_512_4steps 90 --arch "$SD15" --width "$S512" --height "$S512" --num-inference-steps 4 "${R_FAST[@]}"
bench live_sd15_256 80 --live --arch "$SD15" --width "$S256" --height "$S256" --seconds "$LIVE_SECONDS"
bench sdxl_1024_4steps 100 --arch "$SDXL" --width "$S1024" --height "$S1024" --num-inference-steps 4 "${R_SLOW[@]}"
bench sd15_512_1step 80 --arch "$SD15" --width "$S512" --height "$S512" --num-inference-steps 1 "${R_FAST[@]}"

# torch.compile on CUDA: engine/speedups.py's CUDA_COMPILE_MODE ("reduce-overhead": Inductor kernels plus CUDA
# graphs; not "max-autotune", whose per-shape Triton autotuning of the whole UNet takes many minutes on the
# first call). The compile happens in the first warm-up run. Then the same with 8 images per UNet call
# (throughput, lcm-live alone: the seed path is the same as in the step above).
# Each of these two also profiles one more call (bench --profile): its trace comes back as $OUT/profile_*.json
# (ui.perfetto.dev), and its summary (host waits, device busy time, top kernels) is in the step's report.
bench sd15_512_4steps_compile 180 --arch "$SD15" --width "$S512" --height "$S512" --num-inference-steps 4 \
    --compile "${R_FAST[@]}" $(profile_arg sd15_512_4steps_compile)
if (( HAS_BATCH )); then
    bench sd15_512_4steps_batch8_compile 150 --arch "$SD15" --width "$S512" --height "$S512" \
        --num-inference-steps 4 --batch-size 8 --compile --baseline none "${R_SLOW[@]}" \
        $(profile_arg sd15_512_4steps_batch8_compile)
    bench sd15_512_1step_batch8_compile 150 --arch "$SD15" --width "$S512" --height "$S512" \
        --num-inference-steps 1 --batch-size 8 --compile --baseline none "${R_SLOW[@]}"
    # The 4-step aim (60 images/s) was 4 % short at batch 8 on an H200: does a batch of 16 fill the GPU better?
    bench sd15_512_4steps_batch16_compile 150 --arch "$SD15" --width "$S512" --height "$S512" \
        --num-inference-steps 4 --batch-size 16 --compile --baseline none "${R_SLOW[@]}"
fi

# The live studio with --compile (its warm-up compiles the 256² shape; not yet measured).
bench live_sd15_256_compile 120 --live --arch "$SD15" --width "$S256" --height "$S256" --seconds "$LIVE_SECONDS" \
    --compile

# sd15 512² with a ControlNet of its shape (lines mode), lcm-live only: what a ControlNet costs per step on a GPU.
bench sd15_512_4steps_controlnet 80 --arch "$SD15" --width "$S512" --height "$S512" --num-inference-steps 4 \
    --controlnet --baseline none "${R_FAST[@]}"

# SDXL 1024² with nf4 weights: the fast path's memory (the seed's 8 GB card question; lcm-live only).
bench sdxl_1024_4steps_nf4 80 --arch "$SDXL" --width "$S1024" --height "$S1024" --num-inference-steps 4 \
    --quantize nf4 --baseline none "${R_SLOW[@]}"

fi  # issue5

if [[ -n $AMX_PID ]]; then
    log "=== waiting for cpu_amx (its steps end within the budget)"
    wait "$AMX_PID"
    cat "$OUT/cpu_amx.log" >> "$LOG"
fi

# ---------------------------------------------------------------- one JSON with everything
timeout 60 "$PY" - "$STATUS" "$JSONDIR" "$OUT/bench.json" "$DRY" <<'EOF' 2>&1 | tee -a "$LOG"
import json
import sys
from pathlib import Path

status, folder, out, dry = sys.argv[1:5]
steps = []
for line in Path(status).read_text().splitlines():
    name, what, rc, took = (line.split("\t") + ["", "", "", ""])[:4]
    steps.append({"step": name, "status": what, "exit": int(rc) if rc.lstrip("-").isdigit() else None,
                  "seconds": int(took or 0)})
reports = {}
for path in sorted(Path(folder).glob("*.json")):
    try:
        reports[path.stem] = json.loads(path.read_text())
    except ValueError as exc:
        reports[path.stem] = {"unreadable": str(exc)}


def pick(report, *keys):
    for key in keys:
        if not isinstance(report, dict):
            return None
        report = report.get(key)
    return report


summary = {}
for name, r in reports.items():
    row = {
        "device": r.get("device"), "gpu": pick(r, "machine", "gpu"),
        "lcm_live_ms_per_image": pick(r, "lcm_live", "ms_per_image", "median"),
        "seed_ms_per_image": pick(r, "seed", "ms_per_image", "median"),
        "lcm_live_images_per_s": pick(r, "lcm_live", "images_per_s"),
        "speedup_vs_seed": r.get("speedup_vs_seed"), "parity_cosine": r.get("parity_cosine"),
        "roofline_fraction": r.get("roofline_fraction"),
        "lcm_live_unet_ms_per_step": pick(r, "lcm_live", "stages_ms", "unet_per_step"),
        "lcm_live_peak_cuda_gb_alone": r.get("lcm_live_alone_peak_cuda_gb"),
        "lcm_live_speedups": pick(r, "lcm_live", "speedups") or r.get("speedups"),
        "lcm_live_warmup_s": r.get("lcm_live_warmup_s"),
        "live_fps": r.get("live_fps"), "live_latency_ms": r.get("latency_ms"),
        "live_server_ms_median": r.get("server_ms_median"),  # the studio's split: queue, engine call, JPEG, total
        "profile_wall_ms": pick(r, "profile", "wall_ms"), "profile_device_busy_ms": pick(r, "profile", "device_busy_ms"),
        "profile_host_waits": pick(r, "profile", "host_waits"),
    }
    summary[name] = {k: v for k, v in row.items() if v is not None}
Path(out).write_text(json.dumps({"dry_run": dry == "1", "steps": steps, "summary": summary, "reports": reports},
                                indent=1, default=str))
print("=== summary")
for s in steps:
    print(f"  {s['step']:<28} {s['status']:<8} {s['seconds']:>4}s")
for name, row in summary.items():
    print(f"  {name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in row.items() if k not in ("device", "gpu", "lcm_live_speedups")))
    table = pick(reports[name], "profile", "table")
    if table:
        print(table)
print(f"wrote {out}")
EOF
log "=== gpu_check done after $(( $(date +%s) - START ))s; files: $LOG $OUT/bench.json"
rm -rf "$WORK"
