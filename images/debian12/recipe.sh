# Recipe for the debian12 template: Debian bookworm minbase with sysvinit,
# openssh-server and the basic admin tools. Sourced by images/build (see
# docs/templates.md for the contract). Needs network access to deb.debian.org.
DESCRIPTION="Debian 12 (bookworm) minbase, sysvinit, openssh-server, iproute2, procps, ca-certificates"
OS="debian-12"
INIT="/sbin/init"
# sysvinit: SIGINT runs the ctrlaltdel action of /etc/inittab, which is
# "shutdown -h now": runlevel 0 scripts stop the services, then halt(8)
# calls reboot(2), which in a PID namespace kills init (the VE stops).
STOP_SIGNAL="SIGINT"
MIN_DISK_MIB=512

DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

PACKAGES=(
    sysvinit-core       # simple init: /etc/init.d services start at boot
    openssh-server
    ca-certificates
    iproute2
    iputils-ping
    netbase
    procps
    less
)

build_rootfs() {
    local rootfs=$1 recipe_dir=$2
    command -v mmdebstrap >/dev/null || { echo "debian12 recipe: mmdebstrap is missing (apt-get install mmdebstrap)" >&2; return 1; }
    local include
    include=$(IFS=,; echo "${PACKAGES[*]}")
    # Docs, man pages and translations are left out, now and (the dpkg
    # excludes stay in the image) for packages installed later in the VE.
    mmdebstrap --variant=minbase --mode=root --format=directory \
        --include="$include" \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --dpkgopt='path-exclude=/usr/share/lintian/*' \
        --customize-hook="cp -a '$recipe_dir/files/.' \"\$1/\"" \
        --customize-hook='chmod 0755 "$1"/etc/init.d/ssh-hostkeys "$1"/usr/local/sbin/ve-shutdown && chroot "$1" update-rc.d ssh-hostkeys defaults' \
        --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*' \
        --customize-hook='rm -f "$1"/etc/apt/apt.conf.d/99mmdebstrap' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/log/*.log' \
        --customize-hook=': > "$1/etc/machine-id"' \
        bookworm "$rootfs" \
        "deb $DEBIAN_MIRROR bookworm main" \
        "deb $DEBIAN_MIRROR bookworm-updates main" \
        "deb $DEBIAN_SECURITY_MIRROR bookworm-security main"
}
