#!/usr/bin/env bash
# One-shot GPU check (issue 14): everything of the CUDA path in one run, under 8 minutes on one GPU.
#
#   benchmarks/gpu_check.sh              on a CUDA machine: the steps below, figures into docs/*_cuda.*
#   benchmarks/gpu_check.sh --plumbing   anywhere, in seconds: checks the steps' command lines only
#
# Steps (each under its own time limit, its log in $GPU_CHECK_LOGS/<step>.log):
#   preflight    the Python packages the project needs import (names the missing ones);
#   pytest       pytest -m cuda: the device matrix (tests/test_device_matrix.py) and every other cuda test;
#   step_speed   benchmarks/step_speed.py --device cuda --model sd15 sdxl (SD1.5 r16, SDXL r32): torch AdamW
#                fused, bitsandbytes AdamW8bit, HinaAdamW 8-bit defaults and all-off 32-bit, every other Hina
#                optimizer (each in its own process) -> step_speed_cuda.json / .md / .png;
#   convergence  benchmarks/convergence.py --quick --device cuda -> convergence_quick_cuda.json;
#   demo_fp16    the demo (train_network_hina.py) with --mixed_precision fp16, a few steps.
# The limits add up to 8 minutes. It prints the device first and writes a summary, gpu_check_cuda.md, with each step's result and time.
# Exit status: 0 when every step passed, 1 when any failed or timed out.
#
# Without a CUDA device (or with --plumbing) the CUDA parts are skipped, and it says so: each step's
# command line is checked instead (the script exists, every --flag given is one it accepts, values pass
# its argparse choices; pytest collects the cuda tests of the device matrix), in parallel, so CI can run
# it in seconds; the summary then goes to gpu_check_plumbing.md. tests/test_gpu_check_smoke.py does that.
#
# Environment: PYTHON (default .venv/bin/python if present, else python3); GPU_CHECK_OUT (where the figures
# and the summary go; default docs/, and output/gpu_check/ in plumbing mode); GPU_CHECK_LOGS (default
# output/gpu_check/logs); GPU_CHECK_STEPS (a space-separated subset of the step names above, to rerun some);
# GPU_CHECK_DEMO_STEPS (default 40); GPU_CHECK_SPEED_STEPS (default 10);
# <STEP>_LIMIT, e.g. STEP_SPEED_LIMIT=200, to change one step's time limit in seconds.

set -u -o pipefail
cd "$(dirname "$0")/.."

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi

MODE=full
case "${1:-}" in
  "") ;;
  --plumbing) MODE=plumbing ;;
  *) echo "gpu_check.sh: unknown argument '$1'; valid: --plumbing (or nothing)" >&2; exit 2 ;;
esac

ALL_STEPS="preflight pytest step_speed convergence demo_fp16"
for wanted in ${GPU_CHECK_STEPS:-}; do
  if [[ " $ALL_STEPS " != *" $wanted "* ]]; then
    echo "gpu_check.sh: GPU_CHECK_STEPS names '$wanted'; valid: $ALL_STEPS" >&2; exit 2
  fi
done

PROBE=$("$PY" -c 'import torch
print(torch.__version__, "CUDA", torch.version.cuda)
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null)
if [[ $? -ne 0 ]]; then
  echo "gpu_check.sh: '$PY' cannot import torch; set PYTHON to the interpreter that has the project installed" >&2
  exit 1
fi
TORCH=$(sed -n 1p <<< "$PROBE"); DEVICE=$(sed -n 2p <<< "$PROBE")
if [[ -z "$DEVICE" ]]; then
  echo "device: no CUDA device (torch $TORCH): the CUDA parts are skipped; checking the steps' command lines only"
  MODE=plumbing
else
  echo "device: $DEVICE (torch $TORCH)"
  command -v nvidia-smi >/dev/null && nvidia-smi -L
fi

if [[ $MODE == plumbing ]]; then OUT=${GPU_CHECK_OUT:-output/gpu_check}; SUMMARY=gpu_check_plumbing.md
else OUT=${GPU_CHECK_OUT:-docs}; SUMMARY=gpu_check_cuda.md
fi
LOGS=${GPU_CHECK_LOGS:-output/gpu_check/logs}
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
DEMO_DIR=output/gpu_check/demo_fp16

NAMES=()      # step names in order
LIMITS=()     # their time limits (s)
COMMANDS=()   # their command lines, words joined by \x1f (unit separator)

add_step() {  # add_step NAME DEFAULT_LIMIT WORD...  (only the steps GPU_CHECK_STEPS names, when it is set)
  local name=$1 limit_var
  [[ -n "${GPU_CHECK_STEPS:-}" && " $GPU_CHECK_STEPS " != *" $name "* ]] && return
  limit_var="$(echo "$1" | tr '[:lower:]' '[:upper:]')_LIMIT"
  NAMES+=("$name"); LIMITS+=("${!limit_var:-$2}")
  shift 2
  local joined; joined=$(printf '%s\x1f' "$@"); COMMANDS+=("$joined")
}

add_step preflight 30 "$PY" -c '
import importlib, sys
# pyproject.toml: the dependencies and the [test] extra (pytest -m cuda collects every test module)
needed = {"torch": "torch", "bitsandbytes": "bitsandbytes", "accelerate": "accelerate", "diffusers": "diffusers",
          "transformers": "transformers", "toml": "toml", "safetensors": "safetensors", "tqdm": "tqdm",
          "pytest": "pytest", "hypothesis": "hypothesis", "peft": "peft", "lycoris": "lycoris-lora",
          "matplotlib": "matplotlib", "tensorboard": "tensorboard", "prodigyopt": "prodigyopt",
          "schedulefree": "schedulefree", "dadaptation": "dadaptation", "lion_pytorch": "lion-pytorch",
          "came_pytorch": "came-pytorch", "optimi": "torch-optimi"}
missing = [package for module, package in needed.items() if importlib.util.find_spec(module) is None]
if missing:
    sys.exit("missing Python packages: " + " ".join(missing) + " (pip install -e .[test], or carry their wheels)")
import bitsandbytes.functional, torch
if torch.cuda.is_available():
    x = torch.randn(4096, device="cuda")
    codes, state = bitsandbytes.functional.quantize_blockwise(x, blocksize=256)  # its CUDA kernels load
print("packages ok")
'
add_step pytest 140 "$PY" -m pytest -m cuda -q -rfE -p no:cacheprovider
add_step step_speed 190 "$PY" benchmarks/step_speed.py --device cuda --model sd15 sdxl \
  --only "AdamW (fused)" "bnb AdamW8bit" "HinaAdamW (defaults, 8-bit)" "HinaAdamW (all off, 32-bit)" \
  "AdamW_HinaAdaptive" "Automagic" --steps "${GPU_CHECK_SPEED_STEPS:-10}" --json "$OUT/step_speed_cuda.json" \
  --markdown "$OUT/step_speed_cuda.md" --plot "$OUT/step_speed_cuda.png"
add_step convergence 80 "$PY" benchmarks/convergence.py --quick --device cuda \
  --out "$OUT/convergence_quick_cuda.json"
add_step demo_fp16 40 "$PY" train_network_hina.py --mixed_precision fp16 \
  --max_train_steps "${GPU_CHECK_DEMO_STEPS:-40}" --output_dir "$DEMO_DIR"

words_of() { IFS=$'\x1f' read -r -d '' -a WORDS < <(printf '%s' "$1"); }  # -d '': words may hold newlines

check_command_line() {  # the plumbing check of one step's words: exit 0 when its command line is sound
  local step=$1; shift
  if [[ $step == preflight ]]; then "$@"; return; fi          # cheap: imports only (no CUDA, no kernels)
  if [[ $step == pytest ]]; then                             # collect the device matrix's cuda tests only
    local listed
    listed=$("$@" --collect-only tests/test_device_matrix.py) || { echo "$listed"; return 1; }
    local count; count=$(grep -c "cuda\]" <<< "$listed")
    echo "$count cuda tests of the device matrix collected"
    [[ $count -gt 0 ]]
    return
  fi
  local help
  help=$("$@" --help 2>&1) || { echo "$help"; echo "its command line is rejected"; return 1; }
  local word missing=0
  for word in "$@"; do
    if [[ $word == --* ]] && ! grep -q -- "$word\b" <<< "$help"; then
      echo "$word is not an option of ${step}'s script"; missing=1
    fi
  done
  return $missing
}

RESULTS=(); SECONDS_TAKEN=()
if [[ $MODE == plumbing ]]; then
  pids=()
  for i in "${!NAMES[@]}"; do
    words_of "${COMMANDS[$i]}"
    ( start=$SECONDS; check_command_line "${NAMES[$i]}" "${WORDS[@]}" > "$LOGS/${NAMES[$i]}.log" 2>&1
      echo "$? $((SECONDS - start))" > "$LOGS/${NAMES[$i]}.rc" ) &
    pids+=($!)
  done
  wait "${pids[@]}"
fi

for i in "${!NAMES[@]}"; do
  name=${NAMES[$i]}
  if [[ $MODE == full && ${preflight_failed:-0} -eq 1 ]]; then
    RESULTS+=("FAILED: not run (preflight failed)"); SECONDS_TAKEN+=(0)
    echo "== $name: not run (preflight failed)"
    continue
  fi
  if [[ $MODE == plumbing ]]; then
    read -r rc took < "$LOGS/$name.rc"
    rm -f "$LOGS/$name.rc"
    if [[ $rc -eq 0 ]]; then result="command line ok (not run: no CUDA)"; else result="FAILED: command line"; fi
  else
    words_of "${COMMANDS[$i]}"
    echo "== $name (limit ${LIMITS[$i]} s): $(printf '%q ' "${WORDS[@]}")"
    start=$SECONDS
    timeout --kill-after=10 "${LIMITS[$i]}" "${WORDS[@]}" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    took=$((SECONDS - start))
    if [[ $rc -eq 0 ]]; then result="passed"
    elif [[ $rc -eq 124 || $rc -eq 137 ]]; then result="FAILED: timed out after ${LIMITS[$i]} s"
    else result="FAILED: exit status $rc"
    fi
  fi
  echo "== $name: $result (${took} s; log $LOGS/$name.log)"
  [[ $result == FAILED* ]] && tail -n 20 "$LOGS/$name.log" | sed 's/^/   | /'
  RESULTS+=("$result"); SECONDS_TAKEN+=("$took")
  [[ $name == preflight && $result == FAILED* ]] && preflight_failed=1  # no device time on a broken setup
done

failed=0
{
  echo "# GPU check ($MODE)"
  echo
  echo "Written by \`benchmarks/gpu_check.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), tree \`$(git describe --always --dirty 2>/dev/null || echo unknown)\`."
  echo "Device: ${DEVICE:-no CUDA device (CUDA parts skipped; command lines checked only)}; torch $TORCH."
  echo
  echo "| step | result | seconds | command |"
  echo "|---|---|---|---|"
  for i in "${!NAMES[@]}"; do
    words_of "${COMMANDS[$i]}"
    shown=$(printf '%q ' "${WORDS[@]}")  # copy-pasteable
    [[ ${NAMES[$i]} == preflight ]] && shown="$PY -c <imports the dependencies; bitsandbytes' CUDA quantiser>"
    echo "| ${NAMES[$i]} | ${RESULTS[$i]} | ${SECONDS_TAKEN[$i]} | \`${shown% }\` |"
    [[ ${RESULTS[$i]} == FAILED* ]] && failed=1
  done
  if [[ $MODE == full ]]; then
    echo
    echo "Figures: \`$OUT/step_speed_cuda.md\` (.json, .png), \`$OUT/convergence_quick_cuda.json\`; logs under \`$LOGS\`."
  fi
} > "$OUT/.$SUMMARY.tmp.$$"
mv "$OUT/.$SUMMARY.tmp.$$" "$OUT/$SUMMARY"   # atomic: a reader never sees half a summary
echo "summary: $OUT/$SUMMARY"
if [[ $failed -ne 0 ]]; then echo "gpu_check: some steps FAILED"; exit 1; fi
if [[ $MODE == plumbing ]]; then echo "gpu_check: every command line checked ok; no CUDA step ran"
else echo "gpu_check: all steps passed on $DEVICE"
fi
