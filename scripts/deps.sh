# Debian packages the demo and the tests need; sourced by scripts/demo, scripts/test and .ci/run.
# dbus: dbus-daemon, dbus-run-session. systemd-container: systemd-nspawn for the deployment
# tests. libsystemd-dev: the sd-bus C reference of the benchmarks. util-linux: flock(1), setpriv,
# nsenter. systemd: the booted container's init, systemctl, busctl, systemd-analyze,
# systemd-tmpfiles. dbus-user-session: the session bus of the container's user manager.
# dbus-broker: the second pass of the bus tests (scripts/test). perl: COMMANDs of some CLI
# tests (syscall.ph, which perl-base lacks). strace: kills a copy at a chosen system call. acl:
# setfacl, a default ACL on a lock directory's parent.
UNIQUE_INSTANCE_PACKAGES=(dbus systemd-container libsystemd-dev util-linux systemd dbus-user-session dbus-broker perl strace acl)
# The benchmarks also compile their C references (gcc, pkg-config) and strip copies (binutils).
UNIQUE_INSTANCE_BENCH_PACKAGES=(dbus libsystemd-dev util-linux gcc pkg-config binutils)
# The fuzz targets (scripts/fuzz) link libFuzzer, which libfuzzer-sys compiles from C++.
UNIQUE_INSTANCE_FUZZ_PACKAGES=(g++)

# Installs what is missing when we are root; otherwise says exactly what to run, and fails.
ensure_packages() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -eq 0 ]; then
        echo "installing: ${missing[*]}" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "missing Debian packages: ${missing[*]}" >&2
        echo "install them with: sudo apt-get install -y ${missing[*]}" >&2
        return 1
    fi
}
