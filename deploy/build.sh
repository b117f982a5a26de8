#!/usr/bin/env bash
# Builds the release binary the way deploy/Dockerfile does (the Dockerfile runs this script), so
# CI, which has no Docker engine, exercises the same recipe and it cannot rot unnoticed.
# Usage: deploy/build.sh [output-dir]   (default: target/deploy)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/deploy}"
cargo build --locked --release --bin sandbox-runner
mkdir -p "$out"
install -m 0755 target/release/sandbox-runner "$out/sandbox-runner"
"$out/sandbox-runner" --version
