#!/usr/bin/env bash
# What every pdserve node runs under `ray up`: the local, on-premise and AWS configs call this
# script and nothing else, so the path the tests launch is the path users launch.
#
#   node.sh setup --extra mooncake-cuda [--torch SPEC] [--model NAME] [--ray-auth-mode MODE]
#   node.sh start-head --serve-config PATH [ray start flags...]
#   node.sh start-worker [ray start flags...]
#   node.sh stop
#
# `setup` writes ~/.pdserve/env (the venv on PATH and RAY_AUTH_MODE) and sources it from the
# top of ~/.bashrc, so every later command on the node, ours, `ray down`'s `ray stop`, and a
# user's `ray exec ... 'serve status'`, runs with the same Ray auth mode. Ray 2.60 otherwise
# turns token auth on at `ray start` whenever ~/.ray/auth_token exists, while CLI clients with
# the mode unset send no token.
set -euo pipefail

VENV="${PDSERVE_VENV:-$HOME/venv}"
REPO="${PDSERVE_REPO:-$HOME/pdserve}"
ENV_FILE="$HOME/.pdserve/env"
CACHE=/opt/pdserve

say() { echo "pdserve node: $*" >&2; }
die() { say "$*"; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# Install Debian packages only where they are missing (a host without sudo works when they
# are already there).
need_packages() {
    local missing=()
    /sbin/ldconfig -p 2>/dev/null | grep -q 'libibverbs\.so\.1' || missing+=(libibverbs1)
    python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
    [ ${#missing[@]} -eq 0 ] && return
    say "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

load_env() {
    [ -f "$ENV_FILE" ] || die "$ENV_FILE is missing: run 'node.sh setup' first"
    # shellcheck disable=SC1090
    source "$ENV_FILE"
    [ -n "${RAY_AUTH_MODE:-}" ] || die "RAY_AUTH_MODE is not set in $ENV_FILE"
}

setup() {
    local extra="" torch="" model="" auth="disabled"
    while [ $# -gt 0 ]; do
        case "$1" in
            --extra) extra="$2"; shift 2 ;;
            --torch) torch="$2"; shift 2 ;;
            --model) model="$2"; shift 2 ;;
            --ray-auth-mode) auth="$2"; shift 2 ;;
            *) die "setup: unknown option $1" ;;
        esac
    done
    [ -n "$extra" ] || die "setup: --extra mooncake-cuda or mooncake-cpu is required"
    case "$auth" in
        disabled) ;;
        token)
            [ -s "$HOME/.ray/auth_token" ] || [ -n "${RAY_AUTH_TOKEN:-}" ] || die \
                "--ray-auth-mode token needs the cluster's token at ~/.ray/auth_token on every" \
                "node (file_mounts: {\"~/.ray/auth_token\": \"/path/to/token\"})"
            ;;
        *) die "setup: --ray-auth-mode is token or disabled, not '$auth'" ;;
    esac
    need_packages
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    if [ -n "$torch" ]; then
        "$VENV/bin/pip" install -q "$torch"
    fi
    "$VENV/bin/pip" install -q -e "$REPO[$extra]"

    mkdir -p "$(dirname "$ENV_FILE")"
    cat >"$ENV_FILE" <<EOF
# Written by pdserve's node.sh setup; sourced from ~/.bashrc.
export PATH="$VENV/bin:\$PATH"
export RAY_AUTH_MODE=$auth
# Serve names a replica that waits for resources ("to be scheduled") after this many seconds,
# and again each period; pdserve's 503s and /ready quote that message (30 s each by default).
export RAY_SERVE_SLOW_STARTUP_WARNING_S=10
export RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S=10
EOF
    local line="[ -f \"$ENV_FILE\" ] && . \"$ENV_FILE\"  # pdserve"
    if ! grep -qF "# pdserve" "$HOME/.bashrc" 2>/dev/null; then
        # At the top: Debian's .bashrc returns early for non-interactive shells.
        { echo "$line"; cat "$HOME/.bashrc" 2>/dev/null || true; } >"$HOME/.bashrc.pdserve"
        mv "$HOME/.bashrc.pdserve" "$HOME/.bashrc"
    fi

    if [ -n "$model" ]; then
        [ -w "$CACHE" ] || { as_root mkdir -p "$CACHE" && as_root chown "$(id -u)" "$CACHE"; }
        PDSERVE_CACHE="$CACHE" "$VENV/bin/pdserve" pull "$model"
    fi
}

start_head() {
    local serve_config=""
    if [ "${1:-}" = --serve-config ]; then serve_config="$2"; shift 2; fi
    [ -n "$serve_config" ] || die "start-head: --serve-config PATH is required"
    load_env
    ray stop --force >/dev/null 2>&1 || true
    ulimit -n 65536 2>/dev/null || true
    ray start --head --port=6379 --dashboard-host=0.0.0.0 --metrics-export-port=8080 \
        --autoscaling-config="$HOME/ray_bootstrap_config.yaml" "$@"
    # The app deploys in the background; `serve status` (or the API's /ready) tells when it
    # runs and, while it cannot, why.
    serve deploy "$REPO/$serve_config"
}

start_worker() {
    load_env
    ray stop --force >/dev/null 2>&1 || true
    ulimit -n 65536 2>/dev/null || true
    ray start --address="${RAY_HEAD_IP:?RAY_HEAD_IP is set by ray up}:6379" \
        --metrics-export-port=8080 "$@"
}

stop() {
    load_env
    serve shutdown -y >/dev/null 2>&1 || true
    ray stop --force
}

case "${1:-}" in
    setup) shift; setup "$@" ;;
    start-head) shift; start_head "$@" ;;
    start-worker) shift; start_worker "$@" ;;
    stop) shift; stop ;;
    *) die "usage: node.sh setup|start-head|start-worker|stop [options]" ;;
esac
