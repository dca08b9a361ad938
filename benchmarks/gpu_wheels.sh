#!/usr/bin/env bash
# Here, before a GPU run (benchmarks/gpu.sh): the wheels the lent GPU machine lacks, into .whl/
# (git-ignored), at constraints.txt's versions. Its python3 is CPython 3.12 with jax, flax, optax,
# orbax, torch, opencv and numpy already there; these are the rest of what the benchmarks import
# (their import chain's distributions, less the machine's package list), and protobuf, whose version
# there is unknown (googleapis-common-protos needs >= 6.33.5). promise has no wheel on PyPI: it is
# built here (pure Python).
set -euo pipefail
cd "$(dirname "$0")/.."
pins() { for name in "$@"; do grep -i "^$name==" constraints.txt; done; }
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    $(pins array_record googleapis-common-protos grain immutabledict ml_collections portpicker \
           protobuf tensorboardX tensorflow-datasets tensorflow-metadata toml)
python3 -m pip wheel -q --no-deps -w .whl "$(pins promise)"
ls .whl && du -sh .whl
