#!/usr/bin/env bash
# Download, where PyPI is reachable, the wheels the GPU check can use on a GPU machine that has no
# network: CPython 3.12, manylinux x86_64 (the GPU image's Python). The check installs them with
# --no-deps into a side folder, never over that machine's torch (scripts/gpu_stages.py wheels).
#
#   bash scripts/fetch_gpu_wheels.sh [DIR]     # default DIR: .whl (gitignored; carry it to the GPU machine)
#   WITH_TRL=1 bash scripts/fetch_gpu_wheels.sh  # also TRL and the datasets stack it imports
#
# The default set is what the check uses and is small enough to travel (the tree that travels is
# capped at 64 MiB): bitsandbytes (the 4-bit step and 8-bit AdamW; it must hold a CUDA 13 build,
# libbitsandbytes_cuda130.so, for the image's torch cu130) and liger-kernel (the fused-loss peer;
# pure Python on top of the image's triton). TRL is left out by default: no stage uses it (a TRL
# step on a 1.5B model would not fit the 8-minute budget) and it pulls in datasets, dill and multiprocess.
# flash-attn is never carried (a source build against that machine's torch).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-python3}

WHEELS=(bitsandbytes==0.50.2 liger-kernel==0.8.5)
if [ "${WITH_TRL:-0}" = 1 ]; then
  WHEELS+=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
fi

PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1 \
           manylinux_2_31 manylinux_2_34 manylinux_2_35; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done

mkdir -p "$DIR"
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}
  file_prefix=${name//-/_}
  # One version of each name: two would stop the --no-deps install on the GPU machine.
  for old in "$DIR/$file_prefix"-*.whl; do
    [ -e "$old" ] || continue
    case "$(basename "$old")" in
      "$file_prefix-${spec##*==}-"*) ;;
      *) echo "removing $(basename "$old") (another version of $name)"; rm -f "$old" ;;
    esac
  done
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DIR" "$spec"
done

if ls "$DIR"/bitsandbytes-*.whl >/dev/null 2>&1; then
  if unzip -l "$DIR"/bitsandbytes-*.whl | grep -q "libbitsandbytes_cuda130"; then
    echo "bitsandbytes: has a CUDA 13.0 build (libbitsandbytes_cuda130.so)"
  else
    echo "WARNING: the bitsandbytes wheel has no libbitsandbytes_cuda130.so: 4-bit will not load on torch cu130" >&2
  fi
fi
echo "wheels in $DIR:"
ls -l "$DIR"/*.whl | awk '{printf "  %6.1f MiB  %s\n", $5 / 1048576, $NF}'
du -ch "$DIR"/*.whl | tail -1 | awk '{print "total: " $1}'
