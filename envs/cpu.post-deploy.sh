#!/usr/bin/env bash
# Post-deploy step of envs/{cpu,gpu}.yaml: install this checkout's sidpipe package (editable, so
# code changes need no new env) into the freshly created conda env. The checkout is the one the
# workflow runs from (SIDPIPE_CHECKOUT, set by rules/common.smk), since Snakemake runs this in the
# working directory, which `--directory` may put anywhere; else the folder above it holding
# sidpipe's pyproject.toml.
set -euo pipefail
dir=${SIDPIPE_CHECKOUT:-$PWD}
while [ "$dir" != / ] && ! grep -qs '^name = "sidpipe"' "$dir/pyproject.toml"; do dir=$(dirname "$dir"); done
[ "$dir" != / ] || { echo "install-sidpipe: no sidpipe checkout at or above ${SIDPIPE_CHECKOUT:-$PWD}" >&2; exit 1; }
python -m pip install --no-deps -e "$dir"
