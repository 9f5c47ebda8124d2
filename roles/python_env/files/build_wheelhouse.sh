#!/bin/sh
# build_wheelhouse.sh PYTHON DEST INDEX_URL TORCH_SPEC DEEPSPEED_SPEC PACKAGE...
# Gathers every wheel a dsfleet venv needs into DEST, once, on the controller. DeepSpeed ships only
# as a source archive, so it is built here into a wheel against the pinned torch.
set -eu
python=$1 dest=$2 index=$3 torch=$4 deepspeed=$5
shift 5
extra=""
[ -n "$index" ] && extra="--extra-index-url $index"
mkdir -p "$dest"
build="$dest/.build-venv"
"$python" -m venv "$build"
# shellcheck disable=SC2086
"$build/bin/pip" download -q -d "$dest" $extra "$torch" "$@"
# shellcheck disable=SC2086
"$build/bin/pip" install -q --no-index --find-links "$dest" "$torch" "$@"
"$build/bin/pip" wheel -q --no-build-isolation --no-deps -w "$dest" "$deepspeed"
# DeepSpeed's own runtime requirements (pure Python wheels) next to it
# shellcheck disable=SC2086
"$build/bin/pip" download -q -d "$dest" $extra "$torch" "$dest"/deepspeed-*.whl "$@"
rm -rf "$build"
# what it was built from: setup.yml builds it again when the pins differ
printf '%s\n' "$torch $deepspeed $*" > "$dest/.complete"
