#!/usr/bin/env bash
# Obtain the real telemetry components the e2e tests and the example run against.
#
#   scripts/infra.sh [all|otelcol|jaeger|prometheus|alertmanager|compose|apt|env]...   (default: all)
#
# - otelcol:      the OpenTelemetry Collector built with the Collector Builder from
#   collector-config/builder-config.yaml
# - jaeger:       Jaeger v2 built from its Go module (go install cannot build it: its go.mod has
#   a replace directive)
# - prometheus:   Prometheus 3 (prometheus, promtool) built from its Go module, without the
#   web UI's assets (the e2e tests use the HTTP API only)
# - alertmanager: Alertmanager (alertmanager, amtool) built from its Go module, with a
#   placeholder page instead of the web UI
# - apt:          redis-server and wrk from Debian, installed without letting their system
#   daemons start
# - env:          write $CACHE/env.sh exporting the binary paths (every other step does this too)
#
# Go binaries are cached outside the repository, one directory per component and version:
#   ${OTEL_BGTASKS_CACHE:-$HOME/.cache/otel-bgtasks}/<component>-<version>/
# A directory only appears once its build succeeded, so an interrupted build is redone and a
# finished one is never rebuilt. The collector's version includes a hash of the manifest, so
# editing builder-config.yaml produces a new build. Cold builds take several minutes on 2 cores;
# CI should cache the whole directory (keyed on this script and the manifest).
#
# Tests read $CACHE/env.sh (or find the binaries on PATH):
#   . "${OTEL_BGTASKS_CACHE:-$HOME/.cache/otel-bgtasks}/env.sh"
set -euo pipefail

OCB_VERSION=0.165.0
JAEGER_MODULE=github.com/jaegertracing/jaeger
JAEGER_MODULE_VERSION=v1.76.0 # Go module version of Jaeger v2.13.0
JAEGER_VERSION=2.13.0
PROMETHEUS_MODULE=github.com/prometheus/prometheus
PROMETHEUS_MODULE_VERSION=v0.316.0 # Go module version of Prometheus 3.16.0
PROMETHEUS_VERSION=3.16.0
ALERTMANAGER_MODULE=github.com/prometheus/alertmanager
ALERTMANAGER_VERSION=0.35.0
APT_PACKAGES=(redis-server wrk) # wrk: benchmarks

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MANIFEST=$REPO_ROOT/collector-config/builder-config.yaml
CACHE=${OTEL_BGTASKS_CACHE:-$HOME/.cache/otel-bgtasks}
ENV_FILE=$CACHE/env.sh

log() { printf '[infra] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

need_go() {
  command -v go >/dev/null 2>&1 || die "go is required to build $1 (install Go >= 1.24)"
}

manifest_hash() { sha256sum "$MANIFEST" | cut -c1-12; }

# dist.version from the manifest, e.g. 0.165.0
otelcol_version() { sed -n 's/^  version: *\([^ #]*\).*/\1/p' "$MANIFEST" | head -n1; }

otelcol_dir() { echo "$CACHE/otelcol-$(otelcol_version)-$(manifest_hash)"; }
jaeger_dir() { echo "$CACHE/jaeger-$JAEGER_VERSION"; }
prometheus_dir() { echo "$CACHE/prometheus-$PROMETHEUS_VERSION"; }
alertmanager_dir() { echo "$CACHE/alertmanager-$ALERTMANAGER_VERSION"; }

# Seconds since $1 (a value of $SECONDS).
elapsed() { echo $((SECONDS - $1)); }

build_ocb() {
  local dir=$CACHE/ocb-$OCB_VERSION
  if [[ -x $dir/builder ]]; then
    echo "$dir/builder"
    return
  fi
  need_go "the Collector Builder"
  log "installing the Collector Builder v$OCB_VERSION"
  rm -rf "$dir.tmp"
  mkdir -p "$dir.tmp"
  GOBIN=$dir.tmp go install "go.opentelemetry.io/collector/cmd/builder@v$OCB_VERSION" >&2
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
  echo "$dir/builder"
}

build_otelcol() {
  local dir start ocb tmp
  dir=$(otelcol_dir)
  if [[ -x $dir/otelcol-bgtasks ]]; then
    log "collector: cached at $dir"
    return
  fi
  start=$SECONDS
  ocb=$(build_ocb)
  tmp=$dir.tmp
  rm -rf "$tmp"
  mkdir -p "$tmp"
  # Same manifest, only the output path moved out of the repository.
  sed "s|^  output_path:.*|  output_path: $tmp/src|" "$MANIFEST" >"$tmp/builder-config.yaml"
  log "collector: building from $MANIFEST (several minutes when cold)"
  "$ocb" --config "$tmp/builder-config.yaml" >&2
  mv "$tmp/src/otelcol-bgtasks" "$tmp/otelcol-bgtasks"
  rm -rf "$tmp/src"
  rm -rf "$dir"
  mv "$tmp" "$dir"
  log "collector: built in $(elapsed "$start")s"
}

# Copy Go module $1@$2 into $3/src, writable: the module cache is read-only, and a module
# must be the main module for its replace directives to apply.
module_src() {
  local module=$1 version=$2 tmp=$3 moddir
  moddir=$(cd "$tmp" && go mod download -json "$module@$version" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
  [[ -n $moddir && -d $moddir ]] || die "go mod download did not report a directory for $module"
  cp -r "$moddir" "$tmp/src"
  chmod -R u+w "$tmp/src"
}

# ldflags stamping a Prometheus-project binary (prometheus/common/version) with version $1.
prometheus_common_ldflags() {
  echo "-X github.com/prometheus/common/version.Version=$1 -X github.com/prometheus/common/version.Branch=HEAD -X github.com/prometheus/common/version.BuildUser=otel-bgtasks"
}

build_jaeger() {
  local dir start tmp
  dir=$(jaeger_dir)
  if [[ -x $dir/jaeger ]]; then
    log "jaeger: cached at $dir"
    return
  fi
  need_go "Jaeger"
  start=$SECONDS
  tmp=$dir.tmp
  rm -rf "$tmp"
  mkdir -p "$tmp"
  log "jaeger: downloading $JAEGER_MODULE@$JAEGER_MODULE_VERSION"
  module_src "$JAEGER_MODULE" "$JAEGER_MODULE_VERSION" "$tmp"
  log "jaeger: building ./cmd/jaeger (several minutes when cold)"
  (cd "$tmp/src" && go build -trimpath \
    -ldflags "-X $JAEGER_MODULE/internal/version.latestVersion=v$JAEGER_VERSION" \
    -o "$tmp/jaeger" ./cmd/jaeger) >&2
  rm -rf "$tmp/src"
  rm -rf "$dir"
  mv "$tmp" "$dir"
  log "jaeger: built in $(elapsed "$start")s"
}

# Step `compose` (part of `all`): scripts/compose-check, the Compose file checker built on
# compose-go, the loader `docker compose` uses (tests/e2e/test_compose.py runs it on
# docker-compose.yml). Cached by compose-go version and a hash of the checker's source.
COMPOSE_CHECK_SRC=$REPO_ROOT/scripts/compose-check

compose_check_dir() {
  local version hash
  version=$(sed -n 's|^[[:space:]]*github.com/compose-spec/compose-go/v2 \(v[^ ]*\).*|\1|p' \
    "$COMPOSE_CHECK_SRC/go.mod" | head -n1)
  hash=$(cat "$COMPOSE_CHECK_SRC/go.mod" "$COMPOSE_CHECK_SRC/go.sum" "$COMPOSE_CHECK_SRC"/*.go |
    sha256sum | cut -c1-12)
  echo "$CACHE/compose-check-compose-go-$version-$hash"
}

build_compose_check() {
  local dir start tmp
  dir=$(compose_check_dir)
  if [[ -x $dir/compose-check ]]; then
    log "compose-check: cached at $dir"
    return
  fi
  need_go "compose-check"
  start=$SECONDS
  tmp=$dir.tmp
  rm -rf "$tmp"
  mkdir -p "$tmp"
  log "compose-check: building $COMPOSE_CHECK_SRC"
  (cd "$COMPOSE_CHECK_SRC" && go build -trimpath -buildvcs=false -o "$tmp/compose-check" .) >&2
  rm -rf "$dir"
  mv "$tmp" "$dir"
  log "compose-check: built in $(elapsed "$start")s"
}

build_prometheus() {
  local dir start tmp
  dir=$(prometheus_dir)
  if [[ -x $dir/prometheus && -x $dir/promtool ]]; then
    log "prometheus: cached at $dir"
    return
  fi
  need_go "Prometheus"
  start=$SECONDS
  tmp=$dir.tmp
  rm -rf "$tmp"
  mkdir -p "$tmp"
  log "prometheus: downloading $PROMETHEUS_MODULE@$PROMETHEUS_MODULE_VERSION"
  module_src "$PROMETHEUS_MODULE" "$PROMETHEUS_MODULE_VERSION" "$tmp"
  # Without the builtinassets tag the UI is served from web/ui on disk, which is absent: the
  # HTTP API works, the UI pages answer 404/500. Building the assets needs Node.js.
  # The module ships the repository's go.work, whose other modules are not in the module zip.
  log "prometheus: building ./cmd/prometheus ./cmd/promtool (several minutes when cold)"
  (cd "$tmp/src" && GOWORK=off go build -trimpath -tags netgo \
    -ldflags "$(prometheus_common_ldflags "$PROMETHEUS_VERSION")" \
    -o "$tmp/" ./cmd/prometheus ./cmd/promtool) >&2
  rm -rf "$tmp/src"
  rm -rf "$dir"
  mv "$tmp" "$dir"
  log "prometheus: built in $(elapsed "$start")s"
}

build_alertmanager() {
  local dir start tmp sub
  dir=$(alertmanager_dir)
  if [[ -x $dir/alertmanager && -x $dir/amtool ]]; then
    log "alertmanager: cached at $dir"
    return
  fi
  need_go "Alertmanager"
  start=$SECONDS
  tmp=$dir.tmp
  rm -rf "$tmp"
  mkdir -p "$tmp"
  log "alertmanager: downloading $ALERTMANAGER_MODULE@v$ALERTMANAGER_VERSION"
  module_src "$ALERTMANAGER_MODULE" "v$ALERTMANAGER_VERSION" "$tmp"
  # ui/web.go embeds ui/app/dist, which the UI build (Node.js) produces and the module does
  # not ship: embed a placeholder page instead. The API and amtool are unaffected.
  for sub in elm mantine; do
    mkdir -p "$tmp/src/ui/app/dist/$sub"
    printf '<!doctype html><title>Alertmanager</title><p>Built without the web UI; use the API or amtool.</p>\n' \
      >"$tmp/src/ui/app/dist/$sub/index.html"
  done
  log "alertmanager: building ./cmd/alertmanager ./cmd/amtool (minutes when cold)"
  (cd "$tmp/src" && GOWORK=off go build -trimpath -tags netgo \
    -ldflags "$(prometheus_common_ldflags "$ALERTMANAGER_VERSION")" \
    -o "$tmp/" ./cmd/alertmanager ./cmd/amtool) >&2
  rm -rf "$tmp/src"
  rm -rf "$dir"
  mv "$tmp" "$dir"
  log "alertmanager: built in $(elapsed "$start")s"
}

apt_missing() {
  local missing=() pkg
  for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$pkg")
    fi
  done
  echo "${missing[@]}"
}

# Stop the system daemons the packages may have started: the tests run their own processes
# on loopback ports. Only processes owned by the packages' system users are touched.
stop_system_daemons() {
  local svc user name pid
  for svc in prometheus prometheus-alertmanager redis-server; do
    if command -v service >/dev/null 2>&1; then
      service "$svc" stop >/dev/null 2>&1 || true
    fi
  done
  for pair in prometheus:prometheus prometheus:prometheus-alertmanager redis:redis-server; do
    user=${pair%%:*}
    name=${pair#*:}
    id "$user" >/dev/null 2>&1 || continue
    for pid in $(pgrep -u "$user" -x "$name" 2>/dev/null || true); do
      log "apt: stopping system daemon $name (pid $pid)"
      kill "$pid" 2>/dev/null || true
    done
  done
}

install_apt() {
  local missing start saved=""
  read -r -a missing <<<"$(apt_missing)"
  if ((${#missing[@]} == 0)); then
    log "apt: ${APT_PACKAGES[*]} already installed"
    stop_system_daemons
    return
  fi
  if [[ $(id -u) -ne 0 ]]; then
    log "apt: missing ${missing[*]}; run as root (or: sudo apt-get install ${missing[*]}) - skipping"
    return
  fi
  start=$SECONDS
  # policy-rc.d exiting 101 tells invoke-rc.d not to start daemons during installation.
  if [[ -e /usr/sbin/policy-rc.d ]]; then
    saved=$(mktemp)
    cp -p /usr/sbin/policy-rc.d "$saved"
  fi
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  local rc=0
  {
    if [[ -z $(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -print -quit 2>/dev/null) ]]; then
      apt-get update
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
  } >&2 || rc=$?
  if [[ -n $saved ]]; then
    mv "$saved" /usr/sbin/policy-rc.d
  else
    rm -f /usr/sbin/policy-rc.d
  fi
  stop_system_daemons
  ((rc == 0)) || die "apt-get install ${missing[*]} failed"
  log "apt: installed ${missing[*]} in $(elapsed "$start")s"
}

# Path of an executable in $dir, else on PATH (Debian puts some in /usr/sbin), else empty.
find_bin() {
  local name=$1 dir=${2:-}
  if [[ -n $dir && -x $dir/$name ]]; then
    echo "$dir/$name"
  elif command -v "$name" >/dev/null 2>&1; then
    command -v "$name"
  elif [[ -x /usr/sbin/$name ]]; then
    echo "/usr/sbin/$name"
  fi
}

write_env() {
  local var bin tmp
  mkdir -p "$CACHE"
  tmp=$(mktemp "$CACHE/env.sh.XXXXXX")
  {
    echo "# Written by scripts/infra.sh; source it to point the e2e tests at the binaries."
    for entry in \
      "OTELCOL_BIN:otelcol-bgtasks:$(otelcol_dir)" \
      "JAEGER_BIN:jaeger:$(jaeger_dir)" \
      "COMPOSE_CHECK_BIN:compose-check:$(compose_check_dir)" \
      "PROMETHEUS_BIN:prometheus:$(prometheus_dir)" \
      "PROMTOOL_BIN:promtool:$(prometheus_dir)" \
      "ALERTMANAGER_BIN:alertmanager:$(alertmanager_dir)" \
      "AMTOOL_BIN:amtool:$(alertmanager_dir)" \
      "REDIS_SERVER_BIN:redis-server:"; do
      IFS=: read -r var name dir <<<"$entry"
      bin=$(find_bin "$name" "$dir")
      if [[ -n $bin ]]; then
        printf 'export %s=%q\n' "$var" "$bin"
        printf '%s=%s\n' "$var" "$bin" >&2
      else
        printf '# %s: not found\n' "$var"
        printf '%s=(missing)\n' "$var" >&2
      fi
    done
  } >"$tmp"
  mv "$tmp" "$ENV_FILE"
  log "wrote $ENV_FILE"
}

main() {
  local steps=("$@")
  ((${#steps[@]})) || steps=(all)
  mkdir -p "$CACHE"
  for step in "${steps[@]}"; do
    case $step in
    all)
      install_apt
      build_otelcol
      build_jaeger
      build_prometheus
      build_alertmanager
      build_compose_check
      ;;
    otelcol) build_otelcol ;;
    jaeger) build_jaeger ;;
    prometheus) build_prometheus ;;
    alertmanager) build_alertmanager ;;
    compose) build_compose_check ;;
    apt) install_apt ;;
    env) ;;
    -h | --help)
      sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
      return
      ;;
    *) die "unknown step '$step' (expected all, otelcol, jaeger, prometheus, alertmanager, compose, apt or env)" ;;
    esac
  done
  write_env
}

main "$@"
