#!/usr/bin/env bash
# Runs one device check and packs everything it wrote into ONE archive under $OUT, because the device
# tool brings back at most 8 files from $OUT (a check writes a log a step, JSON, JUnit XML and log folders).
#
#   OUT=... bash scripts/gpu-pack.sh NAME -- COMMAND [ARGS...]
#
# COMMAND runs with OUT=gpu-out/NAME (in the repository; GPU_PACK_WORK names another folder than gpu-out); when it ends, however it ends short of a kill,
# $OUT/NAME.tgz holds that folder and $OUT/NAME-summary.txt its summary (the check's *summary.txt), so the
# figures come back even if the archive were left out; $OUT/NAME-progress.txt gets each step's row as it
# ends, and the archive is packed again after each step (scripts/gpu-steps.sh runs GPU_PACK_SNAPSHOT), so a
# command killed outright (the device tool's limit: no EXIT trap runs) still brings back every step that
# ended. Exit: COMMAND's.
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ $# -lt 3 ] || [ "$2" != "--" ]; then
    echo "usage: OUT=DIR bash scripts/gpu-pack.sh NAME -- COMMAND [ARGS...]" >&2
    exit 64
fi
NAME="$1"
shift 2
case "$NAME" in
    *[!A-Za-z0-9._-]* | "") echo "gpu-pack: NAME must be letters, digits, '.', '_' or '-', got '$NAME'" >&2; exit 64 ;;
esac
DEST="${OUT:?gpu-pack: set OUT (the device tool sets it)}"
ROOT_WORK="${GPU_PACK_WORK:-gpu-out}"
WORK="$ROOT_WORK/$NAME"
rm -rf "$WORK"
mkdir -p "$WORK" "$DEST"

pack() {
    bash -c "$GPU_PACK_SNAPSHOT"
    for f in "$WORK"/*summary.txt; do
        [ -f "$f" ] && cp "$f" "$DEST/$NAME-$(basename "$f")"
    done
    echo "gpu-pack: $DEST/$NAME.tgz ($(du -h "$DEST/$NAME.tgz" | cut -f1))" >&2
}
# The archive so far, written aside and renamed (a kill mid-pack leaves the last whole one): after each step
# (scripts/gpu-steps.sh) and at the end. tar's status 1 is a file that changed while read (a log still
# written by something the step left running): the archive is whole all the same.
ABS_DEST="$(cd "$DEST" && pwd)" ABS_WORK="$(cd "$ROOT_WORK" && pwd)"
printf -v GPU_PACK_SNAPSHOT 'tar czf %q -C %q %q; [ $? -le 1 ] && mv -f %q %q' "$ABS_DEST/.$NAME.tgz.part" \
    "$ABS_WORK" "$NAME" "$ABS_DEST/.$NAME.tgz.part" "$ABS_DEST/$NAME.tgz"
export GPU_PACK_SNAPSHOT
trap pack EXIT
export GPU_PACK_PROGRESS="$DEST/$NAME-progress.txt"  # each step's row as it ends (scripts/gpu-steps.sh)
: >"$GPU_PACK_PROGRESS"
OUT="$(cd "$WORK" && pwd)" "$@"
