#!/usr/bin/env bash
# The GPU box's run: the GPU tests, then both GPU benchmarks, from a copy of the tree that is not
# pip-installed (PYTHONPATH=. plus benchmarks/gpu/source_tree.py for dynsplit_sglang.kernels).
#
#   bash benchmarks/gpu/run_all.sh                    # = tests kernels decode_step
#   bash benchmarks/gpu/run_all.sh kernels            # some steps only (one call per step if 10 min is tight)
#   DYNSPLIT_COMMIT=abc1234 bash benchmarks/gpu/run_all.sh   # the commit to record when .git is absent
#
# Writes benchmarks/results/gpu_tests.txt, gpu_kernels.json and gpu_decode_step.json. When $OUT is
# set (the device runner's folder that comes back) they and the logs are copied there every few
# seconds, so a run cut off by a time limit still returns what it had. A failing step does not
# stop the next one; the exit code is the first failure's.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
RESULTS=benchmarks/results
LOGS=${OUT:-$RESULTS}
mkdir -p "$RESULTS" "$LOGS"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests kernels decode_step)

copy_out() {
    [ -n "${OUT:-}" ] && cp -f "$RESULTS"/gpu_tests.txt "$RESULTS"/gpu_kernels.json "$RESULTS"/gpu_decode_step.json "$OUT"/ 2>/dev/null
    return 0
}
if [ -n "${OUT:-}" ]; then
    (while sleep 10; do copy_out; done) &
    copier=$!
    trap 'kill "$copier" 2>/dev/null; copy_out' EXIT
fi

$PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
$PY -c "import flashinfer; print('flashinfer', flashinfer.__version__)" \
    || echo "flashinfer does not import: the FlashInfer tests fail and the benchmarks stop with the reason"

status=0
for step in "${steps[@]}"; do
    start=$(date +%s)
    echo "=== $step"
    case $step in
    tests)
        # Only the files with GPU tests: the others import SGLang, which the GPU box lacks.
        files=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')
        $PY -m pytest -p benchmarks.gpu.source_tree -m gpu -q -rfEs $files 2>&1 | tee "$LOGS/gpu_tests.log"
        rc=${PIPESTATUS[0]}
        {
            echo "command: PYTHONPATH=. python -m pytest -p benchmarks.gpu.source_tree -m gpu -q -rfEs $files"
            echo "exit code: $rc"
            echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
            echo "commit: ${DYNSPLIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
            echo
            tail -n 60 "$LOGS/gpu_tests.log"
        } > "$RESULTS/gpu_tests.txt"
        ;;
    kernels | decode_step)
        $PY -m "benchmarks.gpu.$step" 2>&1 | tee "$LOGS/gpu_$step.log"
        rc=${PIPESTATUS[0]}
        ;;
    *)
        echo "unknown step '$step' (tests, kernels, decode_step)"
        rc=2
        ;;
    esac
    echo "=== $step: exit code $rc, $(( $(date +%s) - start )) s"
    [ "$status" -eq 0 ] && status=$rc
    copy_out
done
exit "$status"
