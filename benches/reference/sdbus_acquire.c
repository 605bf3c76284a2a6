/* The reference for "acquire, D-Bus path": what a C program using libsystemd's sd-bus spends to
 * connect to the session bus (authenticate, Hello) and own a well-known name, with a fresh
 * connection each time. Prints one line per iteration: nanoseconds from before sd_bus_open_user
 * to sd_bus_request_name's return. The connection is closed untimed.
 *
 * usage: sdbus_acquire ITERATIONS NAME_PREFIX    (names NAME_PREFIX.i0, .i1, ...) */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <systemd/sd-bus.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s ITERATIONS NAME_PREFIX\n", argv[0]);
        return 64;
    }
    int n = atoi(argv[1]);
    for (int i = 0; i < n; i++) {
        char name[256];
        snprintf(name, sizeof name, "%s.i%d", argv[2], i);
        sd_bus *bus = NULL;
        long long start = now_ns();
        int r = sd_bus_open_user(&bus);
        if (r < 0) {
            fprintf(stderr, "sd_bus_open_user: %d\n", r);
            return 1;
        }
        /* Flags 0: do not queue is what a plain attempt uses; sd-bus adds nothing of its own. */
        r = sd_bus_request_name(bus, name, 0);
        long long end = now_ns();
        if (r < 0) {
            fprintf(stderr, "sd_bus_request_name(%s): %d\n", name, r);
            return 1;
        }
        printf("%lld\n", end - start);
        sd_bus_flush_close_unref(bus);
    }
    return 0;
}
