/* The floor of unique-instance's lock-file design, in C: the same system calls it makes to take
 * a lock file safely and say who holds it, with no Rust, no serde, no error types. Open the
 * directory and check it (owner and mode: fstat; not a network file system: fstatfs); create the
 * file without following links (O_CREAT|O_EXCL: a released lock file is removed, so it is
 * missing in the usual case) and check it (fstat); take the open-file-description lock
 * (F_OFD_SETLK, as unique-instance does: it can be tested without being taken); check that the
 * path still names the locked file (fstatat); read what a previous holder left (pread); write the holder record
 * (pid, uid, start time from /proc/self/stat and the boot time, executable, host name) with one
 * pwrite. Prints one line per iteration: nanoseconds for all of that. The release (unlink while
 * locked, close) is not timed, as for unique-instance.
 *
 * usage: flock_checked ITERATIONS DIR NAME */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long long start_time_secs(void) {
    char buf[1024];
    int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p) return -1;
    p += 2;
    for (int field = 0; field < 19 && p; field++) p = strchr(p, ' ') ? strchr(p, ' ') + 1 : NULL;
    if (!p) return -1;
    long long ticks = atoll(p);
    long long boot = now_ns(CLOCK_REALTIME) - now_ns(CLOCK_BOOTTIME);
    return (boot + ticks * (1000000000LL / sysconf(_SC_CLK_TCK))) / 1000000000LL;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s ITERATIONS DIR NAME\n", argv[0]);
        return 64;
    }
    int n = atoi(argv[1]);
    const char *name = argv[3];
    for (int i = 0; i < n; i++) {
        long long start = now_ns(CLOCK_MONOTONIC);
        int dir = open(argv[2], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        struct stat dst, st, now;
        struct statfs fs;
        if (dir < 0 || fstat(dir, &dst) != 0 || fstatfs(dir, &fs) != 0) {
            perror(argv[2]);
            return 1;
        }
        if (dst.st_uid != geteuid() || fs.f_type == 0x6969 /* NFS */) return 1;
        int fd = openat(dir, name,
                        O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK,
                        0600);
        if (fd < 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != geteuid()) {
            perror(name);
            return 1;
        }
        struct flock whole = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
        if (fcntl(fd, F_OFD_SETLK, &whole) != 0) {
            perror("F_OFD_SETLK");
            return 1;
        }
        if (fstatat(dir, name, &now, AT_SYMLINK_NOFOLLOW) != 0 || now.st_dev != st.st_dev ||
            now.st_ino != st.st_ino)
            return 1;
        char previous[4096];
        if (pread(fd, previous, sizeof previous, 0) < 0) return 1;
        char exe[4096];
        ssize_t exe_len = readlink("/proc/self/exe", exe, sizeof exe - 1);
        exe[exe_len > 0 ? exe_len : 0] = 0;
        struct utsname uts;
        uname(&uts);
        char record[8192];
        int len = snprintf(record, sizeof record,
                           "{\"pid\":%d,\"uid\":%u,\"start_time\":%lld,\"backend\":[\"lock-file\"],"
                           "\"bus\":null,\"bus_unique_name\":null,\"executable\":\"%s\","
                           "\"hostname\":\"%s\"}\n",
                           getpid(), geteuid(), start_time_secs(), exe, uts.nodename);
        if (pwrite(fd, record, len, 0) != len) return 1;
        long long end = now_ns(CLOCK_MONOTONIC);
        printf("%lld\n", end - start);
        unlinkat(dir, name, 0);
        close(fd);
        close(dir);
    }
    return 0;
}
