#!/usr/bin/env bash
# azurite, the Azure Storage emulator (npm), which queued ingestion needs on the local stack:
# tests start it in memory on free loopback ports (local/kusto_server.py start_azurite) and
# the local Kusto server's data-management endpoint hands out its blob container and queue.
# Pinned in package.json / package-lock.json beside the other npm test tools (3.35.0: later
# releases need Node.js 21+). 10-npm.sh installs it; this step installs it if that has not
# happened and checks that the pinned version runs. Idempotent; runs from the repository root.
set -euo pipefail
cd "$(dirname "$0")/../.."

wanted="$(node -p "require('./package.json').devDependencies.azurite")"
installed() { node_modules/.bin/azurite --version 2>/dev/null || true; }

if [ "$(installed)" != "$wanted" ]; then
    npm ci --silent --no-audit --no-fund
fi
if [ "$(installed)" != "$wanted" ]; then
    echo "30-azurite.sh: azurite $wanted did not install (node_modules/.bin/azurite reports" \
        "'$(installed)'); Node.js $(node --version) and npm $(npm --version) are in use" >&2
    exit 1
fi
