#!/usr/bin/env bash
# Creates (once) a virtualenv with the pinned Python Azure SDK clients the tests
# drive, under $HOME/.cache/aadpodid/venv-<hash of requirements.txt>. Prints the
# venv's python on stdout. Safe to run concurrently.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$HOME/.cache/aadpodid
key=$( { python3 --version; cat "$here/requirements.txt"; } | sha256sum | cut -c1-12)
venv=$root/venv-$key
if [ -x "$venv/bin/python" ] && [ -f "$venv/.complete" ]; then
  echo "$venv/bin/python"
  exit 0
fi
mkdir -p "$root"
exec 9>"$root/.venv.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$here/requirements.txt" >&2
  touch "$venv/.complete"
fi
echo "$venv/bin/python"
