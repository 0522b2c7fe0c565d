#!/usr/bin/env bash
# The README's two commands on a machine whose only Python is another one: for each interpreter
# given, a fresh clone of HEAD in WORKDIR, a PATH on which python3 and python are that interpreter
# and every other python3.X fails, then `make setup`, `make test` and any extra make targets.
# Not part of .ci/run (each Python installs its own torch: a few minutes and several GB each).
#
# Usage: .ci/other_pythons.sh WORKDIR PYTHON [PYTHON ...]
#        e.g. .ci/other_pythons.sh /tmp/pythons ~/.pyenv/versions/3.10.13/bin/python3.10
# Env:   TARGETS  make targets after setup (default "test"; "test demo" runs the demo too)
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$1"
shift
TARGETS="${TARGETS:-test}"
mkdir -p "$WORK"
status=0
for interpreter in "$@"; do
    version="$("$interpreter" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" || exit 1
    bin="$WORK/only-$version/bin"
    mkdir -p "$bin"
    ln -sf "$(command -v "$interpreter")" "$bin/python3"
    ln -sf "$(command -v "$interpreter")" "$bin/python"
    for other in 3.8 3.9 3.10 3.11 3.12 3.13 3.14; do
        [[ $other == "$version" ]] && continue
        printf '#!/bin/sh\necho "python%s is not on this machine" >&2\nexit 127\n' "$other" \
            >"$bin/python$other"
        chmod +x "$bin/python$other"
    done
    clone="$WORK/clone-$version"
    rm -rf "$clone"
    git clone -q "$ROOT" "$clone"
    # no pyenv shims or user bins: python3 is the one interpreter above
    path="$bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    for target in setup $TARGETS; do
        start=$SECONDS
        (cd "$clone" && PATH="$path" make "$target") >"$WORK/$version-$target.log" 2>&1
        rc=$?
        printf 'Python %s (%s): make %s exit %d in %ds; %s\n' "$version" \
            "$("$interpreter" --version 2>&1)" "$target" "$rc" "$((SECONDS - start))" \
            "$(grep -E '(passed|failed|error)' "$WORK/$version-$target.log" | tail -n 1)"
        ((rc == 0)) || status=1
    done
done
exit $status
