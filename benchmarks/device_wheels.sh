#!/usr/bin/env bash
# Build wheels/: what benchmarks/device_check.py installs on a GPU box that has Python 3.12, torch,
# transformers, pyarrow, click, msgpack, ninja, py-cpuinfo, einops and psutil but no package index.
# Versions are those of this checkout's venv, so the box runs what the tests here ran. Nothing the
# box already has is carried: every wheel goes in with --no-deps, so its torch stays.
#
#   bash benchmarks/device_wheels.sh          # then carry wheels/ (ignored by git) with the tree
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=wheels
rm -rf "$OUT" && mkdir -p "$OUT"

# typing-extensions: pydantic needs a newer one than the box may have
names="webdataset braceexpand faiss-cpu pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson"
pins=$("$PY" -c 'import sys, importlib.metadata as m; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $names)
"$PY" -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$OUT" $pins

# DeepSpeed ships an sdist only; its setup.py imports torch, so build against this venv's (no ops
# are compiled: the wheel is pure Python). arra-pipe itself gives the box the `arra-pipe` command.
ds=$("$PY" -c 'import importlib.metadata as m; print(m.version("deepspeed"))')
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "deepspeed==$ds" .

ls -l "$OUT"
wheels=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
awk -v w="$wheels" -v t="$tree" 'BEGIN {printf "wheelhouse %.1f MiB + tree %.1f MiB = %.1f MiB of the 64 MiB a device call carries\n", w / 2^20, t / 2^20, (w + t) / 2^20}'
