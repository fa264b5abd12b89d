#!/usr/bin/env bash
# Post-deploy step of envs/{cpu,gpu}.yaml: install this checkout's sidpipe package (editable, so
# code changes need no new env) into the freshly created conda env. Snakemake runs it from the
# working directory, which is the repo root or a folder below it (e.g. demo/).
set -euo pipefail
dir=$PWD
while [ "$dir" != / ] && ! grep -qs '^name = "sidpipe"' "$dir/pyproject.toml"; do dir=$(dirname "$dir"); done
[ "$dir" != / ] || { echo "install-sidpipe: no sidpipe checkout above $PWD" >&2; exit 1; }
python -m pip install --no-deps -e "$dir"
