#!/usr/bin/env bash
# Builds the test peers (tests/peers/README.md): Jaeger v2 and an OpenTelemetry Collector, from
# the Go modules pinned in tests/peers/*/go.mod and go.sum. Test tooling only: hydra-otel itself is
# pure Python and a user never needs Go.
#
# Everything is cached outside the work tree, in $HYDRA_OTEL_PEERS_CACHE (default
# ${XDG_CACHE_HOME:-~/.cache}/hydra-otel-peers): the Go module and build caches, and each binary
# under a name keyed by a hash of its module's files and the Go version. A repeated run only
# hashes and finds the binaries; a changed go.mod, go.sum or main.go builds anew.
#
# Prints one `name=path` line per peer on stdout (the pytest fixtures read them); progress goes to
# stderr. Exits 3 with a message when Go is missing or too old for the pinned modules.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${HYDRA_OTEL_PEERS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hydra-otel-peers}"

if ! command -v go >/dev/null 2>&1; then
    # Where the official tarball and Debian's package put it, when not on PATH.
    for candidate in ${HYDRA_OTEL_PEERS_GO_DIRS-/usr/local/go/bin /usr/lib/go/bin}; do
        [ -x "$candidate/go" ] && PATH="$candidate:$PATH" && break
    done
fi
if ! command -v go >/dev/null 2>&1; then
    echo "tests/peers/build.sh: Go is not installed. The end-to-end tests against a real" \
        "OpenTelemetry Collector and Jaeger build both from Go modules and need Go 1.26 or later" \
        "(https://go.dev/doc/install); hydra-otel itself does not need Go." >&2
    exit 3
fi

export GOMODCACHE="$cache/gomod" GOCACHE="$cache/gocache"
# The pinned go.mod files name the Go version they need; never download another toolchain.
export GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false -trimpath"
go_version="$(go env GOVERSION)"
mkdir -p "$cache/bin"

# build NAME PACKAGE: go build PACKAGE in tests/peers/NAME unless the keyed binary exists.
build() {
    local name="$1" package="$2" dir="$here/$1" key binary
    key="$(cd "$dir" && { echo "$go_version"; cat go.mod go.sum $(find . -maxdepth 1 -name '*.go' | sort); } |
        sha256sum | cut -c1-16)"
    binary="$cache/bin/$name-$key"
    if [ ! -x "$binary" ]; then
        local required
        required="$(awk '$1 == "go" {print $2; exit}' "$dir/go.mod")"
        if [ "$(printf '%s\n%s\n' "$required" "${go_version#go}" | sort -V | head -n1)" != "$required" ]; then
            echo "tests/peers/build.sh: $name needs Go $required or later, found $go_version" >&2
            exit 3
        fi
        echo "building $name ($package, $go_version) into $binary" >&2
        local started=$SECONDS
        (cd "$dir" && go build -o "$binary.tmp" "$package")
        mv "$binary.tmp" "$binary"
        echo "built $name in $((SECONDS - started))s" >&2
        # Older builds of this peer are of no further use.
        find "$cache/bin" -name "$name-*" ! -name "$name-$key" -delete
    fi
    echo "$name=$binary"
}

build otelcol .
build jaeger github.com/jaegertracing/jaeger/cmd/jaeger
