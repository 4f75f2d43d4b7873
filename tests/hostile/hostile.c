/*
 * hostile: a compromised guest program, for testing that the host survives a hostile guest.
 *
 * It is built like the guest agent (static, with the generated protocol.h beside it, by build_hostile in
 * tests/hostile/__init__.py), copied into a running workspace and run there as root by the agent. It talks on
 * the host channel of the agent: the virtio-serial port whose /sys/class/virtio-ports/vportNpM/name is
 * AGENT_PORT_NAME (or, for medgarbage, the mediation port MEDIATION_PORT_NAME). The agent (PID 1) holds that port open and a port cannot be opened twice, so the program
 * takes a duplicate of PID 1's descriptor with pidfd_open(1) + pidfd_getfd() (found by scanning the /proc/1/fd
 * symlinks for /dev/vportNpM). It only writes to that descriptor, never reads it (the agent keeps receiving
 * the host's frames).
 *
 * Frames (docs/protocol.md): a 9-byte header  type:u8  stream:u32 big-endian  length:u32 big-endian, then
 * length payload bytes. Every frame below is written with a single write(2) so that it lands whole between the
 * agent's own frames.
 *
 * Modes (argv[1]):
 *   forge STREAM  STDOUT frames with payload "INJECTED", then an EXIT frame "exited 0", for stream id STREAM
 *                 (a stream the host gave to some other command, not to this one)
 *   oversize      a STDOUT frame header whose length is MAX_PAYLOAD + 1, followed by 4096 bytes
 *   garbage       frames of unknown types (0x00, 0x7e, 0xff) and of supervisor-only types (CONTROL, REPLY)
 *                 with random payloads, then a truncated frame (header announces 100 bytes, 10 follow)
 *   hello         a second HELLO whose values hold terminal escape sequences ("\x1b]0;pwned\x07\x1b[2J"), and
 *                 a second READY (the host measures the boot time when READY arrives, so a late READY
 *                 claims a different boot time; its payload also says bootSeconds=0.001)
 *   medgarbage PORT
 *                 on the mediation channel: first a guest connection to 127.0.0.1:PORT (the agent's mediation
 *                 listener) that sends "before\n" and prints the answer; then, on the mediation port in one write,
 *                 a frame of an unknown type (0x7e) and an MDATA header whose length is MAX_PAYLOAD + 1; then it
 *                 waits (up to 60 s) for that first connection to be closed and checks that a new connection is
 *                 closed at once. Exit 0 only if both hold ("first connection closed", "new connection refused")
 *   forkbomb      fork without end (refuses to run unless the agent port exists, i.e. only in a guest)
 *   flood         write to stdout without end (plain stdout, no channel tricks)
 *
 * What it did is printed on stderr, one "hostile: ..." line per step. Exit status: 0 done, 1 failed, 2 usage.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* HEADER_SIZE, MAX_PAYLOAD, AGENT_PORT_NAME, F_<frame type>: generated from microagent_engine/protocol.py */
#include "protocol.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("hostile: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

/* "vportNpM" of the virtio-serial port named want into out; -1 if there is none */
static int find_port(const char *want, char *out, size_t outlen)
{
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d)
        return -1;
    struct dirent *de;
    int found = -1;
    while (found < 0 && (de = readdir(d))) {
        if (de->d_name[0] == '.')
            continue;
        char path[PATH_MAX], name[256];
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", de->d_name);
        FILE *f = fopen(path, "re");
        if (!f)
            continue;
        if (fgets(name, sizeof name, f)) {
            name[strcspn(name, "\n")] = '\0';
            if (strcmp(name, want) == 0) {
                snprintf(out, outlen, "%s", de->d_name);
                found = 0;
            }
        }
        fclose(f);
    }
    closedir(d);
    return found;
}

/* a descriptor of ours for PID 1's open port named port_name; exits on failure */
static int steal_port(const char *port_name)
{
    char port[256];
    if (find_port(port_name, port, sizeof port) < 0) {
        say("no virtio-serial port named %s (not in a microagent guest?)", port_name);
        exit(1);
    }
    char want[300];
    snprintf(want, sizeof want, "/dev/%s", port);
    DIR *d = opendir("/proc/1/fd");
    if (!d) {
        say("cannot list /proc/1/fd: %s", strerror(errno));
        exit(1);
    }
    int target = -1;
    struct dirent *de;
    while (target < 0 && (de = readdir(d))) {
        char path[PATH_MAX], link[PATH_MAX];
        snprintf(path, sizeof path, "/proc/1/fd/%s", de->d_name);
        ssize_t n = readlink(path, link, sizeof link - 1);
        if (n <= 0)
            continue;
        link[n] = '\0';
        if (strcmp(link, want) == 0)
            target = atoi(de->d_name);
    }
    closedir(d);
    if (target < 0) {
        say("PID 1 does not hold %s open", want);
        exit(1);
    }
    int pidfd = (int)syscall(SYS_pidfd_open, 1, 0);
    if (pidfd < 0) {
        say("pidfd_open(1): %s", strerror(errno));
        exit(1);
    }
    int fd = (int)syscall(SYS_pidfd_getfd, pidfd, target, 0);
    if (fd < 0) {
        say("pidfd_getfd(PID 1, fd %d): %s", target, strerror(errno));
        exit(1);
    }
    close(pidfd);
    say("found port %s (%s) as PID 1's fd %d; duplicated as our fd %d", port_name, want, target, fd);
    return fd;
}

static int steal_channel(void)
{
    return steal_port(AGENT_PORT_NAME);
}

/* one write(2) of buf; the descriptor is shared with the agent and non-blocking, so wait while it is full */
static void write_once(int fd, const void *buf, size_t len, const char *what)
{
    for (;;) {
        ssize_t n = write(fd, buf, len);
        if (n >= 0) {
            say("wrote %s: %zd of %zu bytes in one write", what, n, len);
            return;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            struct pollfd pf = {.fd = fd, .events = POLLOUT};
            poll(&pf, 1, 1000);
            continue;
        }
        say("writing %s failed: %s", what, strerror(errno));
        exit(1);
    }
}

static size_t put_header(unsigned char *h, int type, uint32_t stream, uint32_t len)
{
    h[0] = (unsigned char)type;
    h[1] = (unsigned char)(stream >> 24);
    h[2] = (unsigned char)(stream >> 16);
    h[3] = (unsigned char)(stream >> 8);
    h[4] = (unsigned char)stream;
    h[5] = (unsigned char)(len >> 24);
    h[6] = (unsigned char)(len >> 16);
    h[7] = (unsigned char)(len >> 8);
    h[8] = (unsigned char)len;
    return HEADER_SIZE;
}

static void send_frame(int fd, int type, uint32_t stream, const void *payload, size_t len, const char *what)
{
    unsigned char buf[HEADER_SIZE + 4096];
    if (len > 4096) {
        say("internal: frame too large");
        exit(1);
    }
    put_header(buf, type, stream, (uint32_t)len);
    memcpy(buf + HEADER_SIZE, payload, len);
    write_once(fd, buf, HEADER_SIZE + len, what);
}

static void mode_forge(uint32_t stream)
{
    int fd = steal_channel();
    char what[64];
    snprintf(what, sizeof what, "STDOUT \"INJECTED\" on stream %u", stream);
    for (int i = 0; i < 3; i++)
        send_frame(fd, F_STDOUT, stream, "INJECTED", 8, what);
    static const char exited[] = EXIT_EXITED " 0";
    snprintf(what, sizeof what, "EXIT \"%s\" on stream %u", exited, stream);
    send_frame(fd, F_EXIT, stream, exited, sizeof exited - 1, what);
}

static void mode_oversize(void)
{
    int fd = steal_channel();
    static unsigned char buf[HEADER_SIZE + 4096];
    put_header(buf, F_STDOUT, 1, MAX_PAYLOAD + 1);
    memset(buf + HEADER_SIZE, 'A', sizeof buf - HEADER_SIZE);
    write_once(fd, buf, sizeof buf, "STDOUT header with length MAX_PAYLOAD+1, then 4096 bytes");
}

static void mode_garbage(void)
{
    int fd = steal_channel();
    static const int types[] = {0x00, 0x7e, 0xff, F_CONTROL, F_REPLY};
    unsigned char payload[64];
    srand((unsigned)time(NULL) ^ (unsigned)getpid());
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        size_t len = (size_t)(rand() % (int)sizeof payload);
        for (size_t j = 0; j < len; j++)
            payload[j] = (unsigned char)rand();
        uint32_t stream = (uint32_t)rand();
        char what[64];
        snprintf(what, sizeof what, "type 0x%02x on stream %u, %zu random bytes", types[i], stream, len);
        send_frame(fd, types[i], stream, payload, len, what);
    }
    unsigned char trunc[HEADER_SIZE + 10];
    put_header(trunc, F_STDOUT, 1, 100);
    memset(trunc + HEADER_SIZE, 'T', 10);
    write_once(fd, trunc, sizeof trunc, "truncated STDOUT frame (header says 100 bytes, 10 follow)");
}

static void mode_hello(void)
{
    int fd = steal_channel();
    static const char hello[] = KEY_VERSION "=1\x1b]0;pwned\x07\x1b[2J\n" KEY_KERNEL "=\x1b]0;pwned\x07\x1b[2J\n";
    send_frame(fd, F_HELLO, 0, hello, sizeof hello - 1, "HELLO with terminal escape sequences");
    static const char ready[] = KEY_SHELL "=" READY_OK "\n" KEY_NET "=" READY_OK "\n" KEY_MOUNTS "=" READY_OK "\n"
        KEY_MEDIATION "=" READY_NONE "\nbootSeconds=0.001\n";
    send_frame(fd, F_READY, 0, ready, sizeof ready - 1, "READY again (a different boot time)");
}

/* a TCP connection to 127.0.0.1:port in the guest; -1 (said why) on failure */
static int connect_local(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        say("connect 127.0.0.1:%d: %s", port, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    return fd;
}

/* read fd until EOF or an error, up to timeout_ms; 1 if it ended (closed), 0 if still open */
static int ends_within(int fd, int timeout_ms)
{
    char buf[4096];
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        long left = timeout_ms - ((now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000);
        if (left <= 0)
            return 0;
        struct pollfd pf = {.fd = fd, .events = POLLIN};
        if (poll(&pf, 1, (int)left) <= 0)
            continue;
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0 && !(n < 0 && errno == EINTR))
            return 1;
    }
}

static void mode_medgarbage(int port)
{
    int first = connect_local(port);
    if (first < 0)
        exit(1);
    if (write(first, "before\n", 7) != 7) {
        say("writing to the first connection: %s", strerror(errno));
        exit(1);
    }
    char answer[256];
    struct pollfd pf = {.fd = first, .events = POLLIN};
    ssize_t n = poll(&pf, 1, 60000) > 0 ? read(first, answer, sizeof answer - 1) : -1;
    if (n <= 0) {
        say("no answer on the first connection");
        exit(1);
    }
    answer[n] = '\0';
    answer[strcspn(answer, "\n")] = '\0';
    say("answer: %s", answer);
    int fd = steal_port(MEDIATION_PORT_NAME);
    unsigned char junk[32];
    srand((unsigned)time(NULL) ^ (unsigned)getpid());
    for (size_t i = 0; i < sizeof junk; i++)
        junk[i] = (unsigned char)rand();
    /* one write(2): once the host has closed the port, a second write would wait for it for ever */
    static unsigned char buf[HEADER_SIZE + sizeof junk + HEADER_SIZE + 4096];
    size_t len = put_header(buf, 0x7e, 1, sizeof junk);
    memcpy(buf + len, junk, sizeof junk);
    len += sizeof junk;
    len += put_header(buf + len, F_MDATA, 1, MAX_PAYLOAD + 1);
    memset(buf + len, 'A', sizeof buf - len);
    write_once(fd, buf, sizeof buf, "on the mediation port: type 0x7e with 32 random bytes, then an MDATA header "
               "with length MAX_PAYLOAD+1 and 4096 bytes");
    close(fd);
    if (!ends_within(first, 60000)) {
        say("first connection still open 60 s after the garbage");
        exit(1);
    }
    say("first connection closed");
    int again = connect_local(port);
    if (again >= 0) {
        if (write(again, "after\n", 6) < 0 && errno != EPIPE && errno != ECONNRESET)
            say("writing to the new connection: %s", strerror(errno));
        if (!ends_within(again, 60000)) {
            say("new connection still open after 60 s");
            exit(1);
        }
    }
    say("new connection refused");
}

static void mode_forkbomb(void)
{
    char port[256];
    if (find_port(AGENT_PORT_NAME, port, sizeof port) < 0) {
        say("refusing to fork-bomb: no %s port here, so this is not a microagent guest", AGENT_PORT_NAME);
        exit(1);
    }
    say("fork bomb starting");
    for (;;)
        fork();
}

static void mode_flood(void)
{
    static char buf[65536];
    memset(buf, 'x', sizeof buf);
    say("flooding stdout");
    for (;;) {
        ssize_t n = write(1, buf, sizeof buf);
        if (n < 0 && errno != EINTR) {
            say("stdout write failed: %s", strerror(errno));
            exit(1);
        }
    }
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "";
    if (strcmp(mode, "forge") == 0 && argc == 3) {
        char *end;
        unsigned long stream = strtoul(argv[2], &end, 10);
        if (*end || end == argv[2] || stream > UINT32_MAX) {
            say("bad stream id %s", argv[2]);
            return 2;
        }
        mode_forge((uint32_t)stream);
    } else if (strcmp(mode, "oversize") == 0 && argc == 2) {
        mode_oversize();
    } else if (strcmp(mode, "garbage") == 0 && argc == 2) {
        mode_garbage();
    } else if (strcmp(mode, "hello") == 0 && argc == 2) {
        mode_hello();
    } else if (strcmp(mode, "medgarbage") == 0 && argc == 3) {
        int port = atoi(argv[2]);
        if (port <= 0 || port > 65535) {
            say("bad port %s", argv[2]);
            return 2;
        }
        mode_medgarbage(port);
    } else if (strcmp(mode, "forkbomb") == 0 && argc == 2) {
        mode_forkbomb();
    } else if (strcmp(mode, "flood") == 0 && argc == 2) {
        mode_flood();
    } else {
        fprintf(stderr, "usage: %s forge STREAM | oversize | garbage | hello | medgarbage PORT | forkbomb | flood\n", argv[0]);
        return 2;
    }
    say("done");
    return 0;
}
