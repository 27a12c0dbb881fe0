#!/usr/bin/env bash
# The README's test command (`make test`): set up what the suites need, then run them all.
# Each scripts/setup/*.sh is idempotent and prepares one external part (a database server, an S3
# server, a browser, ...); it prints what it did and exports nothing but files under .crucible-test/.
set -euo pipefail
cd "$(dirname "$0")/.."
for step in scripts/setup/*.sh; do
  [ -e "$step" ] || continue
  echo "== setup: $step"
  bash "$step"
done
echo "== lint: ruff (style and formatting), import-linter (layers, no kit imports a method, no cycles)"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
