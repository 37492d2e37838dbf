#!/usr/bin/env bash
# Move the default model (98 MB GGUF) to the GPU machine, which takes at most 64 MiB per call.
#
#   here:            bash scripts/device_model.sh split      -> .device/part1, .device/part2, .device/SHA256, .whl/gguf
#   device call 1:   carry [".device/part1"]                   command: bash scripts/device_model.sh stage1
#   device call 2:   carry [".device/part2", ".device/SHA256", ".whl"]   (within ~30 s of call 1: /var/tmp survives
#                    while the machine stays warm)   command: bash scripts/device_model.sh join && <your run>
#
# After `join`, the model is at /var/tmp/lowbit/SmolLM2-135M-Instruct.Q4_1.gguf and the gguf wheel in /tmp/site:
#   export PYTHONPATH=/tmp/site:$PWD/src LOWBIT_MODEL=/var/tmp/lowbit/SmolLM2-135M-Instruct.Q4_1.gguf
set -euo pipefail
MODEL_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
STAGE=/var/tmp/lowbit
cmd=${1:-}

case "$cmd" in
  split)
    py=${PYTHON:-.venv/bin/python}
    src=$("$py" -c 'from lowbit.models.loading import default_model_path; print(default_model_path())')
    mkdir -p .device .whl
    rm -f .device/part1 .device/part2
    size=$(stat -c %s "$src")
    half=$(( (size + 1) / 2 ))
    head -c "$half" "$src" > .device/part1
    tail -c +"$(( half + 1 ))" "$src" > .device/part2
    sha256sum "$src" | awk '{print $1}' > .device/SHA256
    "$py" -m pip download -q --no-deps --only-binary=:all: -d .whl "gguf==$("$py" -c 'import gguf, importlib.metadata as m; print(m.version("gguf"))')"
    echo "split $src ($size bytes) into .device/part1 + .device/part2; wheels in .whl/"
    ;;
  stage1)
    mkdir -p "$STAGE"
    cp .device/part1 "$STAGE/part1"
    echo "staged part 1 in $STAGE ($(stat -c %s "$STAGE/part1") bytes)"
    ;;
  join)
    [ -f "$STAGE/part1" ] || { echo "part 1 is not staged: run stage1 first, then this call within ~30 s" >&2; exit 2; }
    cat "$STAGE/part1" .device/part2 > "$STAGE/$MODEL_NAME.tmp"
    got=$(sha256sum "$STAGE/$MODEL_NAME.tmp" | awk '{print $1}')
    want=$(cat .device/SHA256)
    [ "$got" = "$want" ] || { echo "sha256 mismatch: got $got, want $want" >&2; rm -f "$STAGE/$MODEL_NAME.tmp"; exit 2; }
    mv "$STAGE/$MODEL_NAME.tmp" "$STAGE/$MODEL_NAME"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    echo "model ready: $STAGE/$MODEL_NAME (sha256 ok)"
    ;;
  *)
    echo "usage: $0 split|stage1|join" >&2; exit 2;;
esac
