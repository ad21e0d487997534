#!/usr/bin/env bash
# Installs what the local stack needs on Debian: Java and Maven (Kafka),
# PostgreSQL, Redis, python3-venv, kcat (the README's produce example) and
# Chromium (headless, for the dashboard test). Idempotent and quiet when all
# is present; runs `apt-get update` only when something is missing.
set -euo pipefail

missing=()
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
command -v redis-server >/dev/null || missing+=(redis-server)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
command -v runuser >/dev/null || missing+=(util-linux)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
command -v kcat >/dev/null || missing+=(kcat)  # the README's produce example
command -v chromium >/dev/null || missing+=(chromium)  # tests/integration/ops: the dashboard
command -v go >/dev/null || missing+=(golang-go)        # builds kustomize, below

# kustomize, pinned, for tests/unit/deploy (the k8s manifests' kustomize build): built
# once from the Go module proxy into the cache, outside the repo (about a minute).
KUSTOMIZE_VERSION=v5.5.0
KUSTOMIZE="${WAL_STACK_CACHE_DIR:-$HOME/.cache/wal}/bin/kustomize-${KUSTOMIZE_VERSION}"
install_kustomize() {
    [ -x "$KUSTOMIZE" ] && return 0
    echo "install-deps: building kustomize ${KUSTOMIZE_VERSION} into ${KUSTOMIZE}"
    local bin
    bin="$(mktemp -d)"
    GOBIN="$bin" GOFLAGS=-mod=mod go install "sigs.k8s.io/kustomize/kustomize/v5@${KUSTOMIZE_VERSION}"
    mkdir -p "$(dirname "$KUSTOMIZE")"
    mv "$bin/kustomize" "$KUSTOMIZE"
    rmdir "$bin"
}

if [ ${#missing[@]} -eq 0 ]; then
    install_kustomize
    exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "install-deps: need root to install: ${missing[*]}" >&2; exit 1; }
    sudo=(sudo)
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
install_kustomize
