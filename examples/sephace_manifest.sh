#!/usr/bin/env bash
# Index the real sephaCe bright-field + DAPI set (two fields of view) in place, without copying it.
# Usage: examples/sephace_manifest.sh [SEPHACE_DIR] [OUT_MANIFEST]
# Field Set_1 trains, Set_2 tests (the study's protocol). The "fine" stack (in focus, about +-10 um)
# is the bright_field setting; the "init" stack (in focus, about +-25 um) was acquired separately
# and becomes bright_field_init*. Defocus is rounded to 5 um because the stage z is noisy.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
data="${1:-$here/../shared/data/sephace}"
out="${2:-$here/out/sephace/manifest.parquet}"
lmadda data index "$data/tif" \
  --pattern '(?P<field>Set_\d+)/(?P<channel>fine|init)_.*-Z(?P<z>[0-9.]+)\.tif$' \
  --pattern '(?P<field>Set_\d+)/(?P<channel>fl)\.tif$' \
  --target fl=dapi --rename fine=bright_field --rename init=bright_field_init \
  --split Set_1=train --split Set_2=test --focus-round 5 --out "$out"
