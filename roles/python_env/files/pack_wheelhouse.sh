#!/bin/sh
# pack_wheelhouse.sh DIR ARCHIVE
# Packs DIR's packages (every file but dotfiles: wheels, and any sdist a hand-made `pip download` left) into one
# uncompressed tar for the hosts: one file sent per host instead of one SSH round trip per file (3 hosts, ~70 wheels:
# 98 s per host by directory copy, 12 s for all three as one file). Packs again when the files listed differ from
# ARCHIVE's or one is newer; prints "packed" when it wrote ARCHIVE.
set -eu
export LC_ALL=C
dir=$1 archive=$2
files() { (cd "$dir" && find . -maxdepth 1 -type f ! -name '.*' | sed 's|^\./||' | sort); }
if [ -z "$(files 2>/dev/null)" ]; then
  echo "pack_wheelhouse.sh: no packages in $dir: python_env_wheelhouse holds one directory of wheels per torch" \
       "build; set python_env_wheelhouse_build: true to gather them there" >&2
  exit 2
fi
if [ -f "$archive" ] && [ -z "$(find "$dir" -maxdepth 1 -type f ! -name '.*' -newer "$archive" | head -n 1)" ] &&
   [ "$(files)" = "$(tar -tf "$archive" | sort)" ]; then
  exit 0
fi
tmp="$archive.tmp.$$"
trap 'rm -f "$tmp"' EXIT
files | (cd "$dir" && tar -cf "$tmp" -T -)
mv -f "$tmp" "$archive"
echo packed
