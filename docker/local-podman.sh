#!/usr/bin/env bash
# Podman on a machine without a Docker engine or an image registry, for tests and CI:
#
#   docker/local-podman.sh setup    write a podman configuration (runc, cgroupfs, storage under
#                                   $LOCAL_PODMAN_DIR) and build the base image
#                                   localhost/debian-base:bookworm with debootstrap, if missing;
#                                   prints the two `export` lines every podman call needs
#   docker/local-podman.sh env      print those lines only
#   docker/local-podman.sh clean    remove the storage (images, containers) and the configuration
#
# Then: eval "$(docker/local-podman.sh env)"
#       podman build --ignorefile docker/Dockerfile.dockerignore -f docker/Dockerfile \
#         --build-arg BASE_IMAGE=localhost/debian-base:bookworm -t mistral-qlora .
# Needs root, podman, runc and debootstrap (apt-get install podman runc debootstrap).
#   LOCAL_PODMAN_DIR  configuration and storage (default /tmp/mistral-qlora-podman)
#   DEBIAN_MIRROR     mirror for debootstrap (default: the one apt uses, else deb.debian.org)
set -euo pipefail

DIR="${LOCAL_PODMAN_DIR:-/tmp/mistral-qlora-podman}"
BASE_IMAGE=localhost/debian-base:bookworm

die() { echo "local-podman: $*" >&2; exit 1; }

print_env() {
  echo "export CONTAINERS_CONF=$DIR/containers.conf"
  echo "export CONTAINERS_STORAGE_CONF=$DIR/storage.conf"
}

write_conf() {
  mkdir -p "$DIR/tmp"
  # runc: crun fails here (no CAP_SYS_RESOURCE for its rlimits; hybrid cgroups). The ulimits stay
  # under the host's hard limits, which podman's root defaults exceed.
  cat > "$DIR/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$DIR/tmp"
EOF
  # one store, always through this file (mixing --root flags with it makes every `run --rm` wait 20 s)
  cat > "$DIR/storage.conf" <<EOF
[storage]
driver = "overlay"
runroot = "$DIR/run"
graphroot = "$DIR/root"
EOF
}

mirror() {
  if [[ -n "${DEBIAN_MIRROR:-}" ]]; then echo "$DEBIAN_MIRROR"; return; fi
  local m
  m=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [[ -n "$m" ]] || m=$(awk '$1 == "deb" && $0 ~ /debian/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  echo "${m:-http://deb.debian.org/debian}"
}

base_image() {
  if podman image exists "$BASE_IMAGE"; then
    echo "local-podman: $BASE_IMAGE is there" >&2
    return
  fi
  command -v debootstrap >/dev/null || die "debootstrap not found: apt-get install debootstrap"
  local rootfs="$DIR/rootfs"
  rm -rf "$rootfs"
  echo "local-podman: debootstrap bookworm from $(mirror) (about 20 s)" >&2
  debootstrap --variant=minbase bookworm "$rootfs" "$(mirror)" >"$DIR/debootstrap.log" 2>&1 \
    || { tail -n 20 "$DIR/debootstrap.log" >&2; die "debootstrap failed (log: $DIR/debootstrap.log)"; }
  tar -C "$rootfs" -c . | podman import --quiet - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  echo "local-podman: made $BASE_IMAGE" >&2
}

case "${1:-}" in
  setup)
    [[ $(id -u) -eq 0 ]] || die "needs root"
    for cmd in podman runc; do command -v "$cmd" >/dev/null || die "$cmd not found: apt-get install podman runc"; done
    write_conf
    eval "$(print_env)"
    base_image
    print_env
    ;;
  env) print_env ;;
  clean)
    if [[ -f "$DIR/storage.conf" ]]; then
      eval "$(print_env)"
      podman system reset --force >/dev/null 2>&1 || true
    fi
    rm -rf "$DIR"
    ;;
  *) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
