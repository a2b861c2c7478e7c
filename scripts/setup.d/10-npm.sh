#!/usr/bin/env bash
# npm packages the tests use: @kusto/language-service-next (Microsoft's Kusto.Language),
# which tests/kql/check.js loads to check every KQL text the project emits. Versions are
# pinned in package.json / package-lock.json; node_modules/ is gitignored.
set -euo pipefail
cd "$(dirname "$0")/../.."
npm ci --silent --no-audit --no-fund
