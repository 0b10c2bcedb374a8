#!/usr/bin/env bash
# Regenerates requirements/ci.txt, the constraints CI and the README's test command install with, from pyproject's
# extras `dev,serve` plus requirements/ci.in (the torch pin). Run it on purpose, when a dependency is added or a newer
# version should be tested, and commit the result with the test run that passed on it (see docs/testing.md).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet uv
# --universal: one file with environment markers for every platform and Python >= 3.10 (requires-python), so a fresh
# machine of another kind resolves the same versions as CI.
uv pip compile pyproject.toml requirements/ci.in --extra dev --extra serve --universal --python-version 3.10 \
    --quiet --output-file requirements/ci.txt --custom-compile-command "bash requirements/refresh.sh"
