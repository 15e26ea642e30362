#!/usr/bin/env bash
# Installs the Debian packages the platform, its tests and its benchmarks need.
# Idempotent: does nothing when everything is already installed.
set -euo pipefail

PACKAGES=(
    busybox-static
    nftables
    fuse3
    libfuse3-dev
    crun
    lxc
    mmdebstrap
    iproute2
    e2fsprogs
    uidmap
    util-linux
    procps
    psmisc
    socat
    iputils-ping
    netcat-openbsd
    openssh-client
    libseccomp-dev
    protobuf-compiler
    pkg-config
    etcd-server
    etcd-client
    fio
    libnftables1
    glusterfs-server
    glusterfs-client
)

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
