#!/usr/bin/env bash
# Test-only (tests/test_compose.py): make this offline machine able to build and start
# docker-compose.yml. It has Debian's package mirror and PyPI but no container registry, so:
#   - installs Debian's docker.io and debootstrap, and starts dockerd when none answers;
#   - specwire-local/debian:bookworm: Debian bookworm (debootstrap, minbase) with Python 3.11 and
#     its headers (python:3.11-slim has them) and this machine's trusted CA certificates for apt
#     and pip (also the stand-in for nvidia/cuda's base: deploy/Dockerfile.cuda builds on it);
#   - specwire-local/python:3.11-slim: that, with `python`, and pip finding the CPU torch wheel
#     this machine installs (/opt/wheels), standing in for Docker Hub's python:3.11-slim;
#   - specwire-local/prometheus:debian: Debian's Prometheus package, for prom/prometheus.
# None of this belongs in the shipped files. Exit 77 (with the reason on stdout) where no Docker
# engine can run here: the test then skips.
set -euo pipefail

DEBIAN=specwire-local/debian:bookworm
BASE=specwire-local/python:3.11-slim
PROMETHEUS=specwire-local/prometheus:debian
HERE="$(cd "$(dirname "$0")" && pwd)"
skip() { echo "$*"; exit 77; }

if ! docker info >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || skip "no Docker engine answers and this user cannot start dockerd (not root)"
    if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
        (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io debootstrap) >&2 \
            || skip "could not install Debian's docker.io"
    fi
    nohup dockerd >/var/log/specwire-dockerd.log 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || skip "dockerd did not start: $(tail -n 3 /var/log/specwire-dockerd.log | tr '\n' ' ')"
fi
command -v debootstrap >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap) >&2

if ! docker image inspect "$DEBIAN" >/dev/null 2>&1; then
    root="$(mktemp -d /var/tmp/specwire-rootfs.XXXXXX)"
    trap 'rm -rf "$root"' EXIT
    mirror="$(grep -rhoE 'https?://[^ ]*deb.debian.org/debian' /etc/apt/sources.list /etc/apt/sources.list.d 2>/dev/null | head -n1 || true)"
    debootstrap --variant=minbase --include=python3,python3-dev,python3-venv,ca-certificates \
        bookworm "$root" "${mirror:-http://deb.debian.org/debian}" >&2
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
    chroot "$root" update-ca-certificates >&2
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
    tar -C "$root" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
        --change 'CMD ["python3"]' - "$DEBIAN" >&2
fi

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    context="$(mktemp -d /var/tmp/specwire-base.XXXXXX)"
    cp /opt/wheels/torch-2.13.0+cpu-*.whl "$context/" 2>/dev/null || true
    printf '%s\n' "FROM $DEBIAN" "COPY . /wheels/" \
        "RUN ln -s /usr/bin/python3 /usr/local/bin/python && echo 'find-links = /wheels' >>/etc/pip.conf" \
        >"$context/Dockerfile"
    DOCKER_BUILDKIT=0 docker build -q -t "$BASE" "$context" >&2
    rm -rf "$context"
fi

if ! docker image inspect "$PROMETHEUS" >/dev/null 2>&1; then
    DOCKER_BUILDKIT=0 docker build -q --build-arg "BASE_IMAGE=$BASE" -t "$PROMETHEUS" \
        -f "$HERE/prometheus.Dockerfile" "$HERE" >&2
fi
echo "ready"
