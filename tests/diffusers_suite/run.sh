#!/usr/bin/env bash
# diffusers' own fast tests, unpatched and then with agentsd at ratio=0 everywhere (or with the
# apply_patch keywords of AGENTSD_SUITE_SETTINGS, JSON: agentsd_everywhere.py); compare.
# Usage: tests/diffusers_suite/run.sh DIFFUSERS_CHECKOUT OUT_DIR TEST_PATH...   (paths relative to the
# checkout, e.g. tests/pipelines/stable_diffusion). Needs: pip install parameterized requests-mock
# sentencepiece pytest-timeout. Tests run against the installed diffusers: only the
# checkout's tests/ folder is used, so take the checkout of the installed release.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
checkout=$(cd "$1" && pwd); out=$(mkdir -p "$2" && cd "$2" && pwd); shift 2
work=$(mktemp -d)
cp -r "$checkout/tests" "$work/tests"   # without src/: its conftest then imports the installed diffusers
cd "$work"
export HF_HUB_OFFLINE=1   # tests that need the hub fail fast in both runs instead of waiting on the network
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
py=$(command -v python || command -v python3)   # GPU images may have python3 only
suite="$py -m pytest -q -p no:cacheprovider --timeout 600 -p offline_tokenizer"
$suite --junitxml="$out/plain.xml" "$@" > "$out/plain.log" 2>&1 || true
AGENTSD_SUITE_COUNTS="$out/counts.json" $suite -p agentsd_everywhere --junitxml="$out/patched.xml" "$@" > "$out/patched.log" 2>&1 || true
rm -rf "$work"
"$py" "$here/compare.py" "$out/plain.xml" "$out/patched.xml" | tee "$out/compare.txt"
cat "$out/counts.json"
