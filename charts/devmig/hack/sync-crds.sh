#!/usr/bin/env bash
# Copy the repository's CRDs (crds/, the single source) into the chart's
# files/crds, which templates/crds.yaml renders. Run after editing crds/;
# tests/chart fails while the two differ.
set -euo pipefail
chart=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src="$chart/../../crds"
rm -f "$chart"/files/crds/*.yaml
cp "$src"/*.yaml "$chart/files/crds/"
ls "$chart/files/crds"
