#!/usr/bin/env bash
# The prepared GPU check: one run on one CUDA GPU, a few minutes, so that GPU time goes to measuring.
#   1. environment     the GPU, torch, triton and diffusers versions (stops early if one is missing)
#   2. kernel_tests    tests/test_concat_kernel.py and tests/test_score_kernel.py with the kernels compiled
#   3. sampling        it/s at 512², batch 1 with CFG, fp16: ours against diffusers on the same random weights
#   4. concat_bandwidth, score_bandwidth: each kernel's achieved bandwidth against a plain copy, same device
#   5. reward_memory   peak memory of one reward step at 512² (LoRA r32, K = 5 of 50 DDIM steps, bf16, ViT-H/14)
# Each part's output goes to RESULTS/gpu_<part>.txt, and the summary table to RESULTS/gpu_summary.txt.
#
#   bash bench/gpu_check.sh                                     # on a CUDA machine -> bench/results/gpu_*.txt
#   bash bench/gpu_check.sh --device cpu --small [--results DIR]  # test sizes on a CPU -> cpu_small_*.txt
#   bash bench/gpu_check.sh --parts sampling,reward_memory       # a rerun of some parts (after environment)
#
# It stops at the first part that fails, naming the part and its log. PYTHON names the interpreter (python3).
set -euo pipefail

PARTS="environment kernel_tests sampling concat_bandwidth score_bandwidth reward_memory"
device=cuda small=0 results=bench/results parts=$PARTS
while (($#)); do
  case "$1" in
    --device | --results | --parts)
      (($# >= 2)) || { echo "error: $1 needs a value" >&2; exit 2; }
      case "$1" in --device) device=$2 ;; --results) results=$2 ;; --parts) parts="environment ${2//,/ }" ;; esac
      shift 2 ;;
    --small) small=1; shift ;;
    -h | --help) sed -n '2,14p' "$0" | cut -c3-; exit 0 ;;
    *) echo "error: unknown option '$1'; use --device cuda|cpu, --small, --results DIR, --parts A,B" >&2; exit 2 ;;
  esac
done
[[ $device == cuda || $device == cpu ]] || { echo "error: --device must be cuda or cpu, got '$device'" >&2; exit 2; }
for name in $parts; do
  [[ " $PARTS " == *" $name "* ]] || { echo "error: unknown part '$name'; the parts are: ${PARTS// /, }" >&2; exit 2; }
done

mkdir -p "$results"
results=$(cd "$results" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
kind=gpu sizes=() run="$device"
[[ $device == cuda ]] || kind=cpu
if ((small)); then
  kind+=_small sizes=(--small) run+=", --small"
  # The test-size models are tiny: one thread avoids thread start-up costing more than the maths.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
prefix="$results/${kind}_"
export PYTHONUNBUFFERED=1

rows=() machine="(not known yet)"
started=$(date +%s.%N)
elapsed() { awk -v since="$1" -v now="$(date +%s.%N)" 'BEGIN { printf "%.1f", now - since }'; }
summary() {  # the table of the parts run so far, also to ${prefix}summary.txt
  {
    echo
    echo "GPU check ($run) on $machine, $(date -u '+%Y-%m-%d %H:%M UTC')"
    printf '%-17s %8s  %s\n' part seconds result
    printf '%s\n' "${rows[@]}"
    printf '%-17s %8s  %s\n' total "$(elapsed "$started")" "results in ${prefix}*.txt"
  } | tee "${prefix}summary.txt"
}

# part NAME COMMAND...: run COMMAND, its output to the screen and to ${prefix}NAME.txt, timed; stop on failure.
# The row of the summary table is the output's last "summary: " line, else its last line (pytest's tally).
# A part that --parts leaves out is skipped.
part() {
  local name=$1 log="${prefix}$1.txt" start result
  shift
  [[ " $parts " == *" $name "* ]] || return 0
  start=$(date +%s.%N)
  local command="$*"
  echo "== $name: ${command%%$'\n'*}"  # the command's first line: the environment probe is a whole program
  if ! "$@" 2>&1 | tee "$log"; then
    rows+=("$(printf '%-17s %8s  %s' "$name" "$(elapsed "$start")" "FAILED: the check stopped here")")
    summary
    echo "gpu_check: part '$name' failed after $(elapsed "$start") s; its output is in $log" >&2
    exit 1
  fi
  result=$(grep '^summary: ' "$log" | tail -n 1 | cut -c10-) || true
  [[ -n $result ]] || result=$(grep -v '^\s*$' "$log" | tail -n 1)
  rows+=("$(printf '%-17s %8s  %s' "$name" "$(elapsed "$start")" "$result")")
}

part environment "$python" -c '
import platform, sys
from importlib import metadata
import torch
device = sys.argv[1]
if device == "cuda" and not torch.cuda.is_available():
    sys.exit(f"error: --device cuda, but torch {torch.__version__} sees no CUDA GPU; run this on a GPU machine, "
             "or pass --device cpu --small")
versions = {}
for package in ("triton", "diffusers", "ftfy"):
    try:
        versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
        sys.exit(f"error: {package} is not installed; the check needs it (pip install -r requirements-dev.txt, or "
                 "on a machine without a network, carry its wheel)")
if device == "cuda":
    props = torch.cuda.get_device_properties(0)
    machine = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}, CUDA {torch.version.cuda}"
else:
    names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    machine = f"{names[0] if names else platform.processor() or platform.machine()}, {len(names) or 1} cores"
print(f"machine: {machine}")
found = ", ".join(f"{package} {version}" for package, version in versions.items())
print(f"python {platform.python_version()}, torch {torch.__version__}, {found}")
print(f"summary: torch {torch.__version__}, {found}")
' "$device"
machine=$(grep '^machine: ' "${prefix}environment.txt" | cut -c10-)

# LONGALIGN_TEST_DEVICE=cuda (tests/conftest.py): tensors on the GPU, kernels compiled; cpu: the interpreter.
part kernel_tests env -u TRITON_INTERPRET LONGALIGN_TEST_DEVICE="$device" \
  "$python" -m pytest -q -p no:cacheprovider tests/test_concat_kernel.py tests/test_score_kernel.py
if [[ " $parts " == *" kernel_tests "* ]]; then
  if [[ $device == cuda ]]; then rows[-1]+=" (kernels compiled)"; else rows[-1]+=" (kernels interpreted)"; fi
fi

part sampling "$python" bench/gpu_sampling.py --device "$device" ${sizes[@]+"${sizes[@]}"}

if [[ $device == cuda ]]; then
  kernel_dtype=float16 score_sizes=(--batch 1024 --segments 32 --dim 1024)
else
  kernel_dtype=float32 score_sizes=(--batch 4 --segments 4 --dim 64 --repeats 3)
fi
part concat_bandwidth "$python" bench/segment_encode.py --device "$device" --dtype "$kernel_dtype" --bandwidth-only \
  ${sizes[@]+"${sizes[@]}"}
part score_bandwidth "$python" bench/score_projection.py --device "$device" --dtype "$kernel_dtype" --no-compile \
  "${score_sizes[@]}"

part reward_memory "$python" bench/reward_memory.py --device "$device" ${sizes[@]+"${sizes[@]}"}
summary
