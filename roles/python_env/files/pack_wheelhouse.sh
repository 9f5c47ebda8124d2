#!/bin/sh
# pack_wheelhouse.sh DIR ARCHIVE
# Packs DIR's wheels into one uncompressed tar (wheels are zip files already) for the hosts: one file sent per host
# instead of one SSH round trip per wheel (on 3 hosts, ~70 wheels: 98 s per host by directory copy, 12 s as one
# file). Packs again when the wheels listed differ from ARCHIVE's or one is newer; prints "packed" when it wrote it.
set -eu
export LC_ALL=C
dir=$1 archive=$2
ls "$dir"/*.whl >/dev/null 2>&1 || { echo "pack_wheelhouse.sh: no wheels in $dir" >&2; exit 2; }
if [ -f "$archive" ] && [ -z "$(find "$dir" -maxdepth 1 -name '*.whl' -newer "$archive" | head -n 1)" ] &&
   [ "$(cd "$dir" && ls -- *.whl)" = "$(tar -tf "$archive" | sort)" ]; then
  exit 0
fi
tmp="$archive.tmp.$$"
trap 'rm -f "$tmp"' EXIT
(cd "$dir" && tar -cf "$tmp" -- *.whl)
mv -f "$tmp" "$archive"
echo packed
