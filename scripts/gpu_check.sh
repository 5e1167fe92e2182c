#!/usr/bin/env bash
# One prepared check of tinylm on a machine with an NVIDIA GPU, CuPy and NumPy (PyTorch
# optional), written for a lent machine with no network: it installs nothing.
#
#     scripts/gpu_check.sh                 # on the GPU machine, from the repository root
#     scripts/gpu_check.sh --cpu-dry-run   # the same steps on the CPU, tiny settings
#
# Steps, in order, each under its own `timeout`; a failing step does not stop the others:
#   environment   nvidia-smi, OS, CPUs, memory, git commit
#   imports       Python, NumPy, BLAS, CuPy (CUDA runtime, device), PyTorch, tinylm's
#                 dependencies; on the GPU it fails unless tinylm's backend sees the GPU
#   pytest-cuda   the engine tests' real-CuPy cases: pytest -k "cuda and not fake"
#   gradcheck     python -m tinylm gradcheck --device cuda
#   train         40 steps of the shakespeare-char preset into a temporary directory
#   train-log     median step time and tokens/s, from that run's log.jsonl
#   generate      python -m tinylm generate from that checkpoint, on the GPU
#   train-flash   the long-context path: flash attention and activation recomputation
#                 (--set attention=flash recompute=true), context 1024, 10 steps, and its
#                 step time from log.jsonl
#   bench         python -m tinylm bench --device cuda --config small medium, 3 rounds
#                 (with --compare-torch when PyTorch imports; its side runs on the CPU)
#   torch-cuda    benchmarks/torch_gpt.py --device cuda, small and medium: the GPU peer
#
# Output: ONE report, ${OUT:-./gpu_report}/gpu_report.md (summary table, then each step's
# command, exit status, time and output). Beside it: bench_cuda.json (bench_cpu.json in the
# dry run), the bench results, and gpu_check_full.log, every step's whole output. The report
# is rewritten after every step, so a run that is cut short still leaves one.
# Exit status: 0 when every step passed, 1 otherwise.
#
# Time: the steps share a budget of GPU_CHECK_BUDGET_S seconds (default 450, 7.5 minutes).
# A step's timeout is cut to what is left of it; a step with under 15 s left is not run and
# counts as failed.
#
# tinylm is not pip-installed: the checkout goes first on PYTHONPATH and every command is
# `python -m tinylm ...`, the same program as the `tinylm` entry point. NumPy and regex
# (and matplotlib and tqdm) must already be importable; the imports step says which are.
# PYTHON picks the interpreter (default python3).

set -u -o pipefail

DRY_RUN="${GPU_CHECK_CPU_DRY_RUN:-0}"
for arg in "$@"; do
    case "$arg" in
        --cpu-dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

OUT_DIR="${OUT:-gpu_report}"  # relative to the directory the script is started from
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)" || exit 2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"
REPORT="$OUT_DIR/gpu_report.md"
FULL_LOG="$OUT_DIR/gpu_check_full.log"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/tinylm_gpu_check.XXXXXX")" || exit 2
trap 'rm -rf "$WORK"' EXIT
: >"$FULL_LOG"
: >"$WORK/sections.md"
: >"$WORK/summary.md"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
# The engine tests' matrices are tiny: one BLAS thread, as CI runs them. `tinylm bench`
# sets its own thread counts (--threads) in the processes it times.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"

if [ "$DRY_RUN" = 1 ]; then
    MODE="CPU dry run (--device cpu, tiny settings)"
    DEV=cpu
else
    MODE="GPU (--device cuda)"
    DEV=cuda
fi
export ROOT PY DEV
# 0: PyTorch does not import; 1: it does; 2: it also sees a CUDA GPU
HAVE_TORCH="$("$PY" -c "import torch; print(2 if torch.cuda.is_available() else 1)" \
    2>/dev/null | tail -n 1)"
case "$HAVE_TORCH" in 1|2) ;; *) HAVE_TORCH=0 ;; esac

T_START=$(date +%s)
STARTED_AT="$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
N_FAILED=0
N_STEPS=0

# ----------------------------------------------------------------------------- reporting

write_report() {  # $1: the result line of the header
    {
        echo "# tinylm GPU check"
        echo
        echo "- mode: $MODE"
        echo "- started: $STARTED_AT on $(hostname 2>/dev/null || echo '?')"
        echo "- commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'unknown')," \
             "$(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed files"
        echo "- result: $1"
        echo "- elapsed: $(( $(date +%s) - T_START )) s of a ${BUDGET_S} s budget"
        echo
        echo "| step | result | exit | seconds | timeout (s) |"
        echo "|---|---|---:|---:|---:|"
        cat "$WORK/summary.md"
        echo
        cat "$WORK/sections.md"
    } >"$REPORT.tmp" && mv "$REPORT.tmp" "$REPORT"
}

# record NAME RESULT EXIT SECONDS TIMEOUT COMMAND LOGFILE: one row and one section
record() {
    local name="$1" result="$2" rc="$3" secs="$4" limit="$5" cmd="$6" log="$7" lines
    echo "| $name | $result | $rc | $secs | $limit |" >>"$WORK/summary.md"
    {
        echo "## $name: $result"
        echo
        echo "\`$cmd\`"
        echo
        echo "exit status $rc, $secs s (timeout $limit s)"
        echo
        lines=$(wc -l <"$log")
        if [ "$lines" -gt 300 ]; then
            echo "(the last 300 of $lines lines; gpu_check_full.log has all of them)"
            echo
        fi
        echo '````text'
        tail -n 300 "$log"
        echo '````'
        echo
    } >>"$WORK/sections.md"
    {
        echo "===== $name: $result (exit $rc, $secs s): $cmd"
        cat "$log"
        echo
    } >>"$FULL_LOG"
    printf '%-12s %-26s exit %-4s %4s s\n' "$name" "$result" "$rc" "$secs"
    write_report "running ($N_STEPS steps so far, $N_FAILED failed)"
}

# step NAME TIMEOUT_S COMMAND...: run COMMAND under `timeout`, within what is left of the budget
step() {
    local name="$1" limit="$2"
    shift 2
    local cmd left t0 rc secs result log="$WORK/$name.log"
    cmd="$(printf '%q ' "$@")"
    cmd="${cmd% }"
    N_STEPS=$((N_STEPS + 1))
    left=$(( BUDGET_S - ($(date +%s) - T_START) ))
    if [ "$left" -lt 15 ]; then
        N_FAILED=$((N_FAILED + 1))
        echo "not run: ${left} s of the ${BUDGET_S} s budget left" >"$log"
        record "$name" "FAILED (no time left)" "-" 0 "$limit" "$cmd" "$log"
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1 </dev/null
    rc=$?
    secs=$(( $(date +%s) - t0 ))
    if [ "$rc" -eq 0 ]; then
        result="passed"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        result="FAILED (timed out)"
    else
        result="FAILED"
    fi
    [ "$rc" -ne 0 ] && N_FAILED=$((N_FAILED + 1))
    record "$name" "$result" "$rc" "$secs" "$limit" "$cmd" "$log"
    return "$rc"
}

# skip NAME REASON: a step that does not apply on this machine (not a failure)
skip() {
    N_STEPS=$((N_STEPS + 1))
    echo "$2" >"$WORK/$1.log"
    record "$1" "skipped" "-" 0 "-" "-" "$WORK/$1.log"
}

# ----------------------------------------------------------------------------- helpers

cat >"$WORK/environment.sh" <<'END_OF_FILE'
echo "## nvidia-smi"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi; smi=$?
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm \
        --format=csv 2>/dev/null
else
    echo "nvidia-smi: not found"; smi=1
fi
echo; echo "## system"
uname -a
echo "CPUs: $(nproc --all)"
grep -m1 "model name" /proc/cpuinfo 2>/dev/null
free -g 2>/dev/null | head -2
echo "python: $(command -v "$PY") ($("$PY" --version 2>&1))"
echo "PYTHONPATH=$PYTHONPATH OMP_NUM_THREADS=$OMP_NUM_THREADS"
echo; echo "## git"
git -C "$ROOT" log -1 --format="%H %ci %s" 2>/dev/null || echo "no git metadata"
git -C "$ROOT" status --short 2>/dev/null | head -40
if [ "$DEV" = cuda ]; then exit "$smi"; fi
exit 0
END_OF_FILE

cat >"$WORK/imports.py" <<'END_OF_FILE'
import importlib
import os
import platform
import sys

need_gpu = sys.argv[1] == "cuda"
print("python", platform.python_version(), sys.executable)
problems = []
for name in ("numpy", "regex", "matplotlib", "tqdm", "pytest", "hypothesis", "cupy", "torch"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:<11}", getattr(mod, "__version__", "?"))
    except Exception as exc:
        print(f"{name:<11} not importable ({type(exc).__name__}: {exc})")
        if name in ("numpy", "regex", "pytest") or (name == "cupy" and need_gpu):
            problems.append(name)
try:
    from threadpoolctl import threadpool_info

    for pool in threadpool_info():
        print("thread pool:", pool.get("internal_api"), pool.get("version"),
              pool.get("num_threads"), "threads")
except Exception:
    print("(threadpoolctl not importable: no BLAS details)")
try:
    import cupy as cp

    rt = cp.cuda.runtime
    print("CUDA runtime", rt.runtimeGetVersion(), "driver", rt.driverGetVersion(),
          "devices", rt.getDeviceCount())
    props = rt.getDeviceProperties(0)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    print(f"device 0: {gpu}, compute capability {props['major']}.{props['minor']}, "
          f"{props['totalGlobalMem'] / 2**30:.1f} GiB")
    print("CUPY_TF32 =", os.environ.get("CUPY_TF32", "(unset)"))
except Exception as exc:
    print("cupy device query:", type(exc).__name__, exc)
try:
    import torch

    cuda = torch.cuda.is_available()
    print("torch.cuda.is_available():", cuda, torch.cuda.get_device_name(0) if cuda else "")
except Exception:
    pass
import tinylm
from tinylm import backend

print("tinylm", getattr(tinylm, "__version__", "?"), "from", tinylm.__file__)
ok = backend.cuda_available()
print("tinylm.backend.cuda_available():", ok)
if need_gpu and not ok:
    problems.append("a GPU for tinylm (backend.cuda_available() is False)")
if problems:
    sys.exit("missing: " + ", ".join(problems))
END_OF_FILE

cat >"$WORK/train_log.py" <<'END_OF_FILE'
import json
import statistics
import sys

records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
steps = [r for r in records if r.get("event") == "step"]
evals = [r for r in records if r.get("event") == "eval"]
if not steps:
    sys.exit("no step records in the log")
later = steps[len(steps) // 4:] or steps  # the first steps include CuPy's kernel compilation
dt = statistics.median(r["dt"] for r in later)
tokens_per_s = statistics.median(r["tokens_per_s"] for r in later)
print(f"{len(steps)} steps; median of the last {len(later)}: {dt * 1e3:.1f} ms/step, "
      f"{tokens_per_s:,.0f} tokens/s; first step {steps[0]['dt'] * 1e3:.0f} ms")
print(f"loss: first step {steps[0]['loss']:.4f}, last step {steps[-1]['loss']:.4f}")
for e in evals:
    print(f"eval at step {e['step']}: train {e['train_loss']:.4f}, val {e['val_loss']:.4f}")
END_OF_FILE

# ----------------------------------------------------------------------------- the steps

echo "tinylm GPU check: $MODE; report: $REPORT"
write_report "running"

step environment 60 bash "$WORK/environment.sh"
step imports 120 "$PY" "$WORK/imports.py" "$DEV"

# The `device` fixture (tests/conftest.py) runs every engine test on cpu, fake-cuda and
# cuda; the cuda cases need real CuPy and a GPU and are skipped without them. In the dry
# run they are all skipped, which still proves the selection and the plumbing.
step pytest-cuda 200 "$PY" -m pytest -q -k "cuda and not fake" --continue-on-collection-errors \
    --durations=10 -p no:cacheprovider tests

step gradcheck 150 "$PY" -m tinylm gradcheck --device "$DEV"

RUN="$WORK/run"
if [ "$DRY_RUN" = 1 ]; then
    step train 120 "$PY" -m tinylm train --preset shakespeare-char-cpu --device cpu \
        --out "$RUN" --overwrite --no-progress --max-iters 6 --set n_layers=1 \
        --set d_model=32 --set n_heads=2 --set context_length=32 --set batch_size=4 \
        --set eval_interval=3 --set eval_iters=2 --set log_interval=1 \
        --samples 1 --sample-tokens 40
else
    # nanoGPT's GPU recipe (6x384, context 256, batch 64, dropout 0.2) for a few steps.
    step train 180 "$PY" -m tinylm train --preset shakespeare-char --device cuda \
        --out "$RUN" --overwrite --no-progress --max-iters 40 --set eval_interval=20 \
        --set eval_iters=10 --set log_interval=1 --samples 1 --sample-tokens 200
fi
step train-log 30 "$PY" "$WORK/train_log.py" "$RUN/log.jsonl"

step generate 90 "$PY" -m tinylm generate --checkpoint "$RUN" --device "$DEV" \
    --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-k 200 --seed 0

FLASH_RUN="$WORK/run-flash"
if [ "$DRY_RUN" = 1 ]; then
    step train-flash 90 "$PY" -m tinylm train --preset shakespeare-char-cpu --device cpu \
        --out "$FLASH_RUN" --overwrite --no-progress --max-iters 4 --set n_layers=1 \
        --set d_model=32 --set n_heads=2 --set context_length=48 --set batch_size=2 \
        --set eval_interval=4 --set eval_iters=1 --set log_interval=1 \
        --set attention=flash recompute=true --samples 0
else
    step train-flash 150 "$PY" -m tinylm train --preset shakespeare-char --device cuda \
        --out "$FLASH_RUN" --overwrite --no-progress --max-iters 10 --set eval_interval=10 \
        --set eval_iters=2 --set log_interval=1 --set context_length=1024 --set batch_size=16 \
        --set dropout=0 --set attention=flash recompute=true --samples 0
fi
step train-flash-log 30 "$PY" "$WORK/train_log.py" "$FLASH_RUN/log.jsonl"

COMPARE=()
[ "$HAVE_TORCH" -ge 1 ] && COMPARE=(--compare-torch)
if [ "$DRY_RUN" = 1 ]; then
    step bench 120 "$PY" -m tinylm bench --device cpu --config tiny --steps 2 --warmup 1 \
        --repeat 1 --threads 1 --json "$OUT_DIR/bench_$DEV.json" \
        ${COMPARE[@]+"${COMPARE[@]}"}
else
    # --threads 2 for the CPU side, as in the tables of docs/benchmarks.md.
    step bench 240 "$PY" -m tinylm bench --device cuda --config small medium --steps 10 \
        --warmup 3 --repeat 3 --threads 2 --json "$OUT_DIR/bench_$DEV.json" \
        ${COMPARE[@]+"${COMPARE[@]}"}
fi

if [ "$HAVE_TORCH" = 0 ]; then
    skip torch-cuda "PyTorch does not import here"
elif [ "$DRY_RUN" = 1 ]; then  # the same script on the CPU
    step torch-cuda 60 "$PY" benchmarks/torch_gpt.py --device cpu --config tiny --steps 2 \
        --warmup 1 --threads 1
elif [ "$HAVE_TORCH" = 1 ]; then
    skip torch-cuda "PyTorch imports but sees no CUDA GPU"
else
    step torch-cuda 90 bash -c 'for c in small medium; do
        "$0" benchmarks/torch_gpt.py --device cuda --config "$c" --steps 10 --warmup 3 || exit
    done' "$PY"
fi

# ----------------------------------------------------------------------------- the end

ELAPSED=$(( $(date +%s) - T_START ))
if [ "$N_FAILED" -eq 0 ]; then
    write_report "PASSED (all $N_STEPS steps)"
    echo "gpu_check: all $N_STEPS steps passed in $ELAPSED s; report: $REPORT"
    exit 0
fi
write_report "FAILED ($N_FAILED of $N_STEPS steps)"
echo "gpu_check: $N_FAILED of $N_STEPS steps FAILED in $ELAPSED s; report: $REPORT"
exit 1
