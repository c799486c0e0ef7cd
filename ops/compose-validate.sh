#!/usr/bin/env bash
# Lints docker-compose.yml with DCLint (npm package `dclint`), which also validates it
# against the Compose Specification JSON schema. Exits non-zero on any error or warning.
# Needs Node.js >= 20.19 and access to the npm registry. Usable from CI: no prompts.
set -euo pipefail

DCLINT_VERSION="3.1.0"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec npx --yes "dclint@${DCLINT_VERSION}" --max-warnings 0 --no-color docker-compose.yml
