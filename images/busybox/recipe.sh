# Recipe for the busybox template: Debian's busybox-static as the whole OS.
# Sourced by images/build (see docs/templates.md for the contract).
DESCRIPTION="BusyBox (Debian busybox-static): init, sh, syslogd, httpd on port 80; a few MiB"
OS="busybox"
INIT="/sbin/init"
# busybox init: SIGUSR2 = poweroff. It runs the ::shutdown: actions, kills
# what is left and, since reboot(2) is refused or ignored in a container,
# exits, which stops the VE. SIGTERM (reboot) takes the same path.
STOP_SIGNAL="SIGUSR2"
MIN_DISK_MIB=64

build_rootfs() {
    local rootfs=$1 recipe_dir=$2 busybox=/bin/busybox applet
    if ! file_is_static "$busybox"; then
        echo "busybox recipe: $busybox is not Debian's static busybox (apt-get install busybox-static)" >&2
        return 1
    fi
    install -d -m 0755 "$rootfs"/{bin,sbin,usr/bin,usr/sbin,etc/init.d,root,var/log,var/run,var/www,home,proc,sys,dev,run,mnt}
    chmod 0700 "$rootfs/root"
    install -d -m 1777 "$rootfs/tmp"
    install -m 0755 "$busybox" "$rootfs/bin/busybox"
    # One symlink per applet, where busybox itself says it belongs.
    while read -r applet; do
        [[ $applet == bin/busybox ]] && continue
        [[ -e $rootfs/$applet ]] || ln -s /bin/busybox "$rootfs/$applet"
    done < <("$busybox" --list-full)
    cp -a "$recipe_dir/files/." "$rootfs/"
    chmod 0640 "$rootfs/etc/shadow"
    chmod 0755 "$rootfs"/etc/init.d/*
    chown -R 0:0 "$rootfs"
}

file_is_static() {
    # A dynamically linked busybox would need a libc the template lacks.
    local out
    out=$(LC_ALL=C ldd "$1" 2>&1 || true)
    [[ -x $1 && $out == *"not a dynamic executable"* ]]
}
