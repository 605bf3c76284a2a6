/* The reference for "acquire, lock file only": open + flock + close of a lock file, as the
 * simplest C program would do it. Prints one line per iteration: nanoseconds for the three calls.
 *
 * usage: flock_acquire ITERATIONS PATH */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s ITERATIONS PATH\n", argv[0]);
        return 64;
    }
    int n = atoi(argv[1]);
    for (int i = 0; i < n; i++) {
        long long start = now_ns();
        int fd = open(argv[2], O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (fd < 0 || flock(fd, LOCK_EX | LOCK_NB) != 0) {
            perror(argv[2]);
            return 1;
        }
        close(fd);
        long long end = now_ns();
        printf("%lld\n", end - start);
    }
    return 0;
}
