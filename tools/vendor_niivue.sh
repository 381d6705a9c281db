#!/usr/bin/env bash
# Re-fetch NiiVue's browser build into mmai/assets/niivue/ (run at build time, never at run time).
#
#   tools/vendor_niivue.sh [VERSION]     (default: the version in mmai/assets/niivue/VERSION)
#
# npm installs @niivue/niivue and its runtime dependencies into a temporary folder (no install
# scripts run); we copy the self-contained UMD bundle (dist/niivue.umd.js, which defines the
# global `niivue`), NiiVue's BSD-2-Clause licence (the npm tarball does not ship it, so its text is
# written here as it stands in github.com/niivue/niivue/blob/main/LICENSE), the licences of the
# dependencies the bundle includes, and the version.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=mmai/assets/niivue
version="${1:-$(cat "$dest/VERSION" 2>/dev/null || echo 0.69.0)}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm init -y >/dev/null && npm install --ignore-scripts --no-audit --no-fund --omit=optional \
  "@niivue/niivue@$version" >/dev/null)
pkg="$tmp/node_modules/@niivue/niivue"
got="$(node -p "require('$pkg/package.json').version")"
lic="$(node -p "require('$pkg/package.json').license")"
[ "$lic" = "BSD-2-Clause" ] || { echo "vendor_niivue: @niivue/niivue $got is licensed $lic, not BSD-2-Clause" >&2; exit 1; }
mkdir -p "$dest"
cp "$pkg/dist/niivue.umd.js" "$dest/niivue.umd.js"
echo "$got" > "$dest/VERSION"
cat > "$dest/LICENSE" <<'LIC'
BSD 2-Clause License

Copyright (c) 2021, Niivue
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
LIC
# The licences of the runtime dependencies bundled into niivue.umd.js (npm ls --all --omit=dev).
{
  echo "Third-party code bundled in niivue.umd.js (@niivue/niivue $got), with the licence text each"
  echo "package ships on npm."
  for dir in $(cd "$tmp" && npm ls --all --parseable --omit=dev --omit=optional 2>/dev/null | sort -u); do
    [ "$dir" = "$tmp" ] && continue
    [ "$dir" = "$pkg" ] && continue
    name="$(node -p "require('$dir/package.json').name + '@' + require('$dir/package.json').version + ' (' + require('$dir/package.json').license + ')'")"
    echo
    echo "================================================================================"
    echo "$name"
    echo "================================================================================"
    f="$(ls "$dir" | grep -iE '^(licen[cs]e|copying)' | head -1 || true)"
    if [ -n "$f" ]; then cat "$dir/$f"; else echo "(no licence file in the npm package; see its package.json)"; fi
  done
} > "$dest/THIRD-PARTY-LICENSES.txt"
sha="$(sha256sum "$dest/niivue.umd.js" | cut -d' ' -f1)"
size="$(stat -c %s "$dest/niivue.umd.js")"
echo "vendor_niivue: @niivue/niivue $got -> $dest/niivue.umd.js ($size bytes, sha256 $sha)"
