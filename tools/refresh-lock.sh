#!/usr/bin/env bash
# `make lock`: resolve the newest versions pyproject.toml allows in a fresh venv (torch pinned,
# installed first), run the whole suite on them, and only if it passes write them as the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TORCH_VERSION:?}" "${LOCK:?}"
venv=.venv-lock
candidate=$(mktemp "${TMPDIR:-/tmp}/dreamloom-lock.XXXXXX")
trap 'rm -f "$candidate"' EXIT
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip setuptools
"$venv/bin/pip" install -q "torch==$TORCH_VERSION"
"$venv/bin/pip" install -q --no-build-isolation -e '.[dev]'
{
    sed -n '1,3p' "$LOCK"  # the header that says what the file is
    echo "# python $("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])'), $(date +%Y-%m-%d)"
    "$venv/bin/pip" freeze --all --exclude-editable | grep -v '^torch=='
} > "$candidate"
echo "resolved: $(grep -vc '^#' "$candidate") packages; running the suite on them"
# The suite's lock test compares the installed versions with this candidate, not the old lock.
DREAMLOOM_LOCK="$candidate" "$venv/bin/python" -m pytest -q
cp "$candidate" "$LOCK"
echo "suite passed: $LOCK rewritten (git diff $LOCK shows what moved); make clean && make test to use it"
