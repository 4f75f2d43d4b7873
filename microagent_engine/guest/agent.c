/*
 * microagent guest agent.
 *
 * In a VM this is PID 1 (/init in the initramfs): it loads the virtio modules, mounts the workspace root
 * filesystem, switches into it and then serves exec requests over the virtio-serial port named
 * AGENT_PORT_NAME.  With "--connect PATH" it skips the boot steps and speaks the same protocol over a unix
 * stream socket (used by the host-side tests, tests/test_agent_protocol.py).
 *
 * Mediation bridge: when CONFIG has a "p<port>" entry, the agent listens on TCP 127.0.0.1:<port> inside the
 * guest and relays every accepted connection over a second channel (the virtio-serial port named
 * MEDIATION_PORT_NAME, or "--mediation-connect PATH" in test mode) as MOPEN/MDATA/MEOF/MCLOSE frames.
 *
 * The wire protocol is described in docs/protocol.md; the host side lives in microagent_engine/protocol.py.
 *
 * Build: microagent_engine/guest/initramfs.py (build_agent) writes protocol.h, generated from protocol.py, beside
 * this file and runs gcc -static -O2 -Wall; the binary is cached under the state dir by the hash of both.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/random.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef RAMFS_MAGIC
#define RAMFS_MAGIC 0x858458f6
#endif
#ifndef TMPFS_MAGIC
#define TMPFS_MAGIC 0x01021994
#endif

/* ---- protocol constants ------------------------------------------------------------------------ */

/* Every constant, entry tag, status, mode, key and reason this agent shares with the host, and every frame type
 * F_<NAME>: generated from microagent_engine/protocol.py (render_c_header) and written beside this file by the
 * build. Never spell one of them here: tests/test_agent_protocol.py fails on a hand-written copy. */
#include "protocol.h"

#define AGENT_EXIT_ARG "--exit-at-once" /* the warmer's child: the binary started only to exit */
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define STDIN_BACKPRESSURE (8u << 20) /* stop reading the channel while this much stdin is queued */
#define MED_ACCEPT_BATCH 64
#define STR_(x) #x
#define STR(x) STR_(x)
/* the EXIT of an EXEC whose payload is malformed */
#define MALFORMED_EXEC_EXIT EXIT_FAILED_TO_START " " STR(EXIT_CODE_CANNOT_RUN) " malformed EXEC request"

/* ---- state --------------------------------------------------------------------------------------- */

/* bytes accepted but not yet written: the unsent part is buf[off .. len) */
struct wqueue {
    char *buf;
    size_t off, len, cap;
};

struct session {
    struct session *next;
    uint32_t stream;
    pid_t pid; /* also the process group id (the child calls setsid) */
    int in_fd, out_fd, err_fd;
    struct wqueue in; /* STDIN bytes not yet written to the command's stdin pipe */
    int in_eof;
    int exited, wstatus;
    int timed_out, killed;
    int64_t deadline; /* timeout deadline (0 = none) */
    int64_t kill_at;  /* SIGKILL after the grace period */
    int64_t grace_ms;
    int64_t drain_until;
};

/* one guest program's TCP connection to 127.0.0.1:<mediation port> */
struct mconn {
    struct mconn *next;
    uint32_t id;
    int fd;
    int closing;       /* the host sent MCLOSE: flush what is queued, then close */
    int rd_eof;        /* the guest program finished sending (MEOF sent); the host's answer may still come */
    int dead;          /* closed; freed at the top of the main loop */
    struct wqueue out; /* host -> guest bytes not yet written to the socket */
    int64_t over_since; /* when the queue reached MED_BUF_CAP (or last progress since), 0 = below it */
};

struct env {
    char **v;
    size_t n, cap;
};

/* A frame channel to the host: the agent port or the mediation port (in test mode a unix socket each).
 * Writes block until the host takes them (backpressure); reads are buffered until a frame is complete. */
struct channel {
    const char *label;     /* for log messages */
    const char *port_name; /* virtio-serial port name */
    int fd;                /* -1 while closed */
    char path[PATH_MAX];   /* /dev/vportNpM of port_name */
    int64_t reopen_at;     /* when to retry opening the port (0 = not scheduled; never in test mode) */
    int reopen_logged;     /* the current run of failed opens was logged once */
    unsigned char *rbuf;   /* HEADER_SIZE + MAX_PAYLOAD bytes, allocated when first opened */
    size_t rlen;           /* bytes of an incomplete frame in rbuf */
    void (*on_open)(void); /* just opened (or NULL) */
    void (*on_lost)(const char *why); /* just closed: what else goes with it */
    void (*dispatch)(int type, uint32_t stream, const unsigned char *p, size_t len);
};

static void dispatch(int type, uint32_t stream, const unsigned char *p, size_t len);
static void med_dispatch(int type, uint32_t stream, const unsigned char *p, size_t len);
static void main_chan_lost(const char *why);
static void med_chan_lost(const char *why);
static void send_hello(void);

static struct channel chan = {.label = "channel", .port_name = AGENT_PORT_NAME, .fd = -1, .on_open = send_hello,
                              .on_lost = main_chan_lost, .dispatch = dispatch};
static struct channel med_chan = {.label = "mediation channel", .port_name = MEDIATION_PORT_NAME, .fd = -1,
                                  .on_lost = med_chan_lost, .dispatch = med_dispatch};

/* how this process runs (set in main) and whether it is shutting down */
static struct {
    int is_pid1;
    int test_mode;                /* --connect PATH: speak over a unix socket, skip the boot steps */
    const char *connect_path;     /* --connect PATH */
    const char *med_connect_path; /* --mediation-connect PATH (test mode) */
    int sig_fd;                   /* signalfd of SIGCHLD */
    int log_fd;                   /* the console (as PID 1), else -1: stderr */
    int halting;                  /* HALT received */
    char root_dev[PATH_MAX];      /* microagent.root= (mounted at the first CONFIG) */
    int root_ro;                  /* microagent.ro=1 */
    int disks_loaded;             /* the disk driver was loaded at boot, its devices left unbound */
    char boot_net[512];           /* the NIC's set-up at boot, a READY verdict ("": there was no NIC) */
    int warm_fd;                  /* wakes the warmer (start_warmer); -1: none or woken */
} agent = {.sig_fd = -1, .log_fd = -1, .warm_fd = -1};

/* what CONFIG set: the default env of every exec, and what READY reports */
static struct {
    struct env env;
    int applied; /* the first CONFIG was applied (a later one only updates env and hostname) */
    char ready_shell[32];
    char ready_net[512];
    char ready_mounts[2048];
    char ready_mediation[512];
} config = {.ready_shell = READY_MISSING, .ready_net = READY_NONE, .ready_mounts = READY_OK,
          .ready_mediation = READY_NONE};

/* the console shell on /dev/ttyS0, respawned when it exits */
static struct {
    char *path; /* NULL: none */
    pid_t pid;  /* 0: not running */
    int64_t respawn_at;
    int64_t last_spawn;
} console;

/* running commands */
static struct {
    struct session *list;
    size_t stdin_queued; /* bytes in every session's stdin queue */
} execs;

/* mediation bridge (its channel is med_chan) */
static struct {
    int port;      /* 0 = no mediation */
    int listen_fd; /* 127.0.0.1:port */
    int cut;       /* MCUT received, no MRESUME since */
    uint32_t next_id;
    struct mconn *conns;
} med = {.listen_fd = -1, .next_id = 1};

/* ---- small helpers ------------------------------------------------------------------------------- */

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

static void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logmsg(const char *fmt, ...)
{
    char buf[1024];
    int n = snprintf(buf, sizeof buf, "microagent-agent: ");
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(buf + n, sizeof buf - (size_t)n - 2, fmt, ap);
    va_end(ap);
    if (m < 0)
        m = 0;
    size_t len = (size_t)n + (size_t)m;
    if (len > sizeof buf - 2)
        len = sizeof buf - 2;
    buf[len++] = '\n';
    int fd = agent.log_fd >= 0 ? agent.log_fd : 2;
    ssize_t w = write(fd, buf, len);
    (void)w;
}

static void set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0)
        fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void xclose(int *fd)
{
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

static int mkdir_p(const char *path, mode_t mode)
{
    char tmp[PATH_MAX];
    size_t len = strlen(path);
    if (len == 0 || len >= sizeof tmp) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(tmp, path, len + 1);
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            if (mkdir(tmp, mode) < 0 && errno != EEXIST)
                return -1;
            *p = '/';
        }
    }
    if (mkdir(tmp, mode) < 0 && errno != EEXIST)
        return -1;
    return 0;
}

static void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n);
    if (!q) {
        logmsg("out of memory");
        abort();
    }
    return q;
}

static char *xstrdup(const char *s)
{
    char *d = strdup(s);
    if (!d) {
        logmsg("out of memory");
        abort();
    }
    return d;
}

/* ---- write queues ------------------------------------------------------------------------------------ */

/* append n bytes to q (dropping what was sent, growing as needed) */
static void queue_append(struct wqueue *q, const void *data, size_t n)
{
    if (q->off > 0) {
        memmove(q->buf, q->buf + q->off, q->len - q->off);
        q->len -= q->off;
        q->off = 0;
    }
    if (q->len + n > q->cap) {
        size_t c = q->cap ? q->cap : 65536;
        while (c < q->len + n)
            c *= 2;
        q->buf = xrealloc(q->buf, c);
        q->cap = c;
    }
    memcpy(q->buf + q->len, data, n);
    q->len += n;
}

static size_t queue_pending(const struct wqueue *q)
{
    return q->len - q->off;
}

static void queue_free(struct wqueue *q)
{
    free(q->buf);
    q->buf = NULL;
    q->off = q->len = q->cap = 0;
}

/* ---- environment ----------------------------------------------------------------------------------- */

static void env_set(struct env *e, const char *kv)
{
    const char *eq = strchr(kv, '=');
    if (!eq || eq == kv)
        return;
    size_t klen = (size_t)(eq - kv) + 1; /* include '=' */
    for (size_t i = 0; i < e->n; i++) {
        if (strncmp(e->v[i], kv, klen) == 0) {
            free(e->v[i]);
            e->v[i] = xstrdup(kv);
            return;
        }
    }
    if (e->n + 2 > e->cap) {
        e->cap = e->cap ? e->cap * 2 : 16;
        e->v = xrealloc(e->v, e->cap * sizeof(char *));
    }
    e->v[e->n++] = xstrdup(kv);
    e->v[e->n] = NULL;
}

static void env_clear(struct env *e)
{
    for (size_t i = 0; i < e->n; i++)
        free(e->v[i]);
    e->n = 0;
    if (e->v)
        e->v[0] = NULL;
}

/* defaults, then CONFIG env; the caller adds the EXEC env */
static void env_base(struct env *e)
{
    e->v = NULL;
    e->n = e->cap = 0;
    env_set(e, "PATH=" DEFAULT_PATH);
    env_set(e, "HOME=/root");
    env_set(e, "TERM=linux");
    for (size_t i = 0; i < config.env.n; i++)
        env_set(e, config.env.v[i]);
}

static void env_free(struct env *e)
{
    env_clear(e);
    free(e->v);
    e->v = NULL;
    e->cap = 0;
}

/* ---- channels (the agent port and the mediation port) ---------------------------------------------- */

static void med_setup(const char *value);

static int write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n > 0) {
            p += n;
            len -= (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd pf = {.fd = fd, .events = POLLOUT};
            int r = poll(&pf, 1, -1);
            if (r < 0 && errno != EINTR)
                return -1;
            if (r > 0 && !(pf.revents & POLLOUT) && (pf.revents & (POLLERR | POLLHUP | POLLNVAL)))
                return -1;
            continue;
        }
        return -1;
    }
    return 0;
}

/* blocking write of one frame to fd; -1 if the channel failed */
static int write_frame(int fd, int type, uint32_t stream, const void *data, size_t len)
{
    unsigned char hdr[HEADER_SIZE];
    hdr[0] = (unsigned char)type;
    hdr[1] = (unsigned char)(stream >> 24);
    hdr[2] = (unsigned char)(stream >> 16);
    hdr[3] = (unsigned char)(stream >> 8);
    hdr[4] = (unsigned char)stream;
    hdr[5] = (unsigned char)(len >> 24);
    hdr[6] = (unsigned char)(len >> 16);
    hdr[7] = (unsigned char)(len >> 8);
    hdr[8] = (unsigned char)len;
    if (len > 0 && len <= 4096) {
        unsigned char small[HEADER_SIZE + 4096];
        memcpy(small, hdr, HEADER_SIZE);
        memcpy(small + HEADER_SIZE, data, len);
        return write_all(fd, small, HEADER_SIZE + len);
    }
    if (write_all(fd, hdr, HEADER_SIZE) < 0 || (len > 0 && write_all(fd, data, len) < 0))
        return -1;
    return 0;
}

/* the channel closed (EOF, an error, an oversized frame): its on_lost hook runs (for the agent channel in test
 * mode it exits the agent); in a VM the port is then reopened every PORT_RETRY_MS, in test mode never */
static void chan_lost(struct channel *c, const char *why)
{
    if (c->fd < 0)
        return;
    xclose(&c->fd);
    c->rlen = 0;
    c->on_lost(why);
    if (agent.test_mode)
        return;
    logmsg("%s closed (%s), reopening %s", c->label, why, c->path);
    c->reopen_logged = 0;
    c->reopen_at = mono_ms() + PORT_RETRY_MS;
}

static void chan_send(struct channel *c, int type, uint32_t stream, const void *data, size_t len)
{
    if (c->fd < 0)
        return;
    if (write_frame(c->fd, type, stream, data, len) < 0)
        chan_lost(c, "write failed");
}

static void chan_send_str(struct channel *c, int type, uint32_t stream, const char *s)
{
    chan_send(c, type, stream, s, strlen(s));
}

static void chan_send_error(struct channel *c, uint32_t stream, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void chan_send_error(struct channel *c, uint32_t stream, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    chan_send_str(c, F_ERROR, stream, buf);
}

/* fd is the channel now (non-blocking) */
static void chan_attach(struct channel *c, int fd)
{
    if (!c->rbuf)
        c->rbuf = xrealloc(NULL, HEADER_SIZE + MAX_PAYLOAD);
    c->fd = fd;
    c->rlen = 0;
    c->reopen_logged = 0;
    if (c->on_open)
        c->on_open();
}

/* read what the channel has, dispatch every complete frame, keep the partial rest */
static void chan_read(struct channel *c)
{
    ssize_t n;
    do {
        n = read(c->fd, c->rbuf + c->rlen, HEADER_SIZE + MAX_PAYLOAD - c->rlen);
    } while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return;
    if (n <= 0) {
        chan_lost(c, n == 0 ? "EOF" : strerror(errno));
        return;
    }
    c->rlen += (size_t)n;
    size_t off = 0;
    while (c->fd >= 0 && c->rlen - off >= HEADER_SIZE) {
        const unsigned char *h = c->rbuf + off;
        uint32_t stream = ((uint32_t)h[1] << 24) | ((uint32_t)h[2] << 16) | ((uint32_t)h[3] << 8) | h[4];
        uint32_t len = ((uint32_t)h[5] << 24) | ((uint32_t)h[6] << 16) | ((uint32_t)h[7] << 8) | h[8];
        if (len > MAX_PAYLOAD) {
            chan_send_error(c, stream, "frame length %u exceeds %u", len, MAX_PAYLOAD);
            chan_lost(c, "oversized frame");
            return;
        }
        if (c->rlen - off < HEADER_SIZE + (size_t)len)
            break;
        c->dispatch(h[0], stream, h + HEADER_SIZE, len);
        off += HEADER_SIZE + (size_t)len;
    }
    if (c->fd < 0) {
        c->rlen = 0;
        return;
    }
    if (off > 0) {
        memmove(c->rbuf, c->rbuf + off, c->rlen - off);
        c->rlen -= off;
    }
}

/* find the virtio-serial port called c->port_name: its /dev path into c->path; -1 if there is none */
static int chan_find_port(struct channel *c)
{
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d)
        return -1;
    struct dirent *de;
    int found = -1;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.')
            continue;
        char path[PATH_MAX], name[256];
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", de->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        ssize_t n = read(fd, name, sizeof name - 1);
        close(fd);
        if (n <= 0)
            continue;
        name[n] = '\0';
        while (n > 0 && (name[n - 1] == '\n' || name[n - 1] == ' '))
            name[--n] = '\0';
        if (strcmp(name, c->port_name) == 0) {
            snprintf(c->path, sizeof c->path, "/dev/%s", de->d_name);
            found = 0;
            break;
        }
    }
    closedir(d);
    return found;
}

/* open the port found by chan_find_port; if that fails or the host side is not connected yet, retry in PORT_RETRY_MS */
static void chan_open_port(struct channel *c)
{
    c->reopen_at = 0;
    int fd = open(c->path, O_RDWR | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (fd < 0) {
        if (!c->reopen_logged)
            logmsg("cannot open %s: %s (retrying)", c->path, strerror(errno));
        c->reopen_logged = 1;
        c->reopen_at = mono_ms() + PORT_RETRY_MS;
        return;
    }
    struct pollfd pf = {.fd = fd, .events = POLLIN | POLLOUT};
    if (poll(&pf, 1, 0) >= 0 && (pf.revents & POLLHUP)) {
        /* virtio-serial: the host side is not connected yet */
        if (!c->reopen_logged)
            logmsg("waiting for the host to connect to %s", c->path);
        c->reopen_logged = 1;
        close(fd);
        c->reopen_at = mono_ms() + PORT_RETRY_MS;
        return;
    }
    chan_attach(c, fd);
}

/* test mode: connect to the unix socket at path; -1 with why not in err */
static int chan_connect_unix(struct channel *c, const char *path, char *err, size_t errlen)
{
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof sa.sun_path) {
        snprintf(err, errlen, "socket path too long: %.200s", path);
        return -1;
    }
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        snprintf(err, errlen, "connect %.200s: %s", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    set_nonblock(fd);
    chan_attach(c, fd);
    return 0;
}

/* timers: reopening a lost port */
static void chan_timers(struct channel *c, int64_t now)
{
    if (c->fd < 0 && c->reopen_at && now >= c->reopen_at)
        chan_open_port(c);
}

/* when chan_timers has something to do next, -1 if never */
static int64_t chan_next_deadline(const struct channel *c)
{
    return c->fd < 0 && c->reopen_at ? c->reopen_at : -1;
}

/* ---- the agent channel: HELLO ------------------------------------------------------------------------ */

static void send_hello(void)
{
    struct utsname u;
    char buf[512];
    if (uname(&u) < 0)
        snprintf(u.release, sizeof u.release, "unknown");
    snprintf(buf, sizeof buf, KEY_VERSION "=%d\n" KEY_KERNEL "=%s\n", PROTOCOL_VERSION, u.release);
    chan_send_str(&chan, F_HELLO, 0, buf);
}

/* ---- sessions (running commands) ---------------------------------------------------------------- */

static struct session *find_session(uint32_t stream)
{
    for (struct session *s = execs.list; s; s = s->next)
        if (s->stream == stream)
            return s;
    return NULL;
}

static void close_stdin(struct session *s)
{
    xclose(&s->in_fd);
    execs.stdin_queued -= queue_pending(&s->in);
    queue_free(&s->in);
}

static void signal_group(struct session *s, int sig)
{
    if (kill(-s->pid, sig) < 0 && errno == ESRCH)
        kill(s->pid, sig);
}

static void finish_session(struct session *s)
{
    char buf[64];
    close_stdin(s);
    xclose(&s->out_fd);
    xclose(&s->err_fd);
    if (s->timed_out)
        snprintf(buf, sizeof buf, EXIT_TIMED_OUT " %d", EXIT_CODE_TIMED_OUT);
    else if (WIFSIGNALED(s->wstatus))
        snprintf(buf, sizeof buf, EXIT_SIGNALED " %d", WTERMSIG(s->wstatus));
    else
        snprintf(buf, sizeof buf, EXIT_EXITED " %d", WEXITSTATUS(s->wstatus));
    chan_send_str(&chan, F_EXIT, s->stream, buf);
    for (struct session **pp = &execs.list; *pp; pp = &(*pp)->next) {
        if (*pp == s) {
            *pp = s->next;
            break;
        }
    }
    free(s);
}

static void flush_stdin(struct session *s)
{
    while (s->in_fd >= 0 && s->in.off < s->in.len) {
        ssize_t n = write(s->in_fd, s->in.buf + s->in.off, s->in.len - s->in.off);
        if (n > 0) {
            s->in.off += (size_t)n;
            execs.stdin_queued -= (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        /* EPIPE or another error: the reader is gone, drop what is queued */
        close_stdin(s);
        return;
    }
    if (s->in_fd >= 0 && s->in.off == s->in.len) {
        s->in.off = s->in.len = 0;
        if (s->in_eof)
            close_stdin(s);
    }
}

static void pump_output(struct session *s, int is_err)
{
    static char buf[OUT_CHUNK];
    int *fdp = is_err ? &s->err_fd : &s->out_fd;
    if (*fdp < 0)
        return;
    ssize_t n = read(*fdp, buf, sizeof buf);
    if (n > 0) {
        chan_send(&chan, is_err ? F_STDERR : F_STDOUT, s->stream, buf, (size_t)n);
        return;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    xclose(fdp);
}

static void reset_signals_in_child(void)
{
    /* dispositions first, then the mask: no handler of ours may run in a vfork child */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    for (int i = 1; i < NSIG; i++)
        sigaction(i, &sa, NULL);
    sigset_t empty;
    sigemptyset(&empty);
    sigprocmask(SIG_SETMASK, &empty, NULL);
}

static void close_fds_except(int keep)
{
    /* keep < 0: close everything from 3 up */
#ifdef SYS_close_range
    int ok;
    if (keep >= 3) {
        ok = (keep == 3 || syscall(SYS_close_range, 3u, (unsigned)keep - 1, 0u) == 0) &&
             syscall(SYS_close_range, (unsigned)keep + 1, ~0u, 0u) == 0;
    } else {
        ok = syscall(SYS_close_range, 3u, ~0u, 0u) == 0;
    }
    if (ok)
        return;
#endif
    long max = sysconf(_SC_OPEN_MAX);
    if (max < 0 || max > 65536)
        max = 65536;
    for (int fd = 3; fd < max; fd++)
        if (fd != keep)
            close(fd);
}

static void child_fail(int errfd, int err)
{
    ssize_t w = write(errfd, &err, sizeof err);
    (void)w;
    _exit(EXIT_CODE_NOT_FOUND);
}

static void exit_failed_to_start(uint32_t stream, int err)
{
    char buf[256];
    snprintf(buf, sizeof buf, EXIT_FAILED_TO_START " %d %s", err == ENOENT ? EXIT_CODE_NOT_FOUND : EXIT_CODE_CANNOT_RUN,
             strerror(err));
    chan_send_str(&chan, F_EXIT, stream, buf);
}

static int64_t parse_ms(const char *s, int64_t dflt)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < 0)
        return dflt;
    return (int64_t)v;
}

/* a parsed EXEC request; argv points into the frame's payload */
struct exec_req {
    char **argv;
    struct env env; /* defaults, CONFIG env, then the EXEC's */
    const char *cwd;
    int64_t timeout_ms, grace_ms;
    int want_stdin;
};

static void exec_req_free(struct exec_req *req)
{
    free(req->argv);
    req->argv = NULL;
    env_free(&req->env);
}

/* the EXEC payload's entries into req; on a malformed payload answer ERROR + EXIT and return -1 */
static int parse_exec(uint32_t stream, const unsigned char *payload, size_t len, struct exec_req *req)
{
    if (len == 0 || payload[len - 1] != '\0') {
        chan_send_error(&chan, stream, "malformed EXEC: entries are not NUL-terminated");
        chan_send_str(&chan, F_EXIT, stream, MALFORMED_EXEC_EXIT);
        return -1;
    }
    size_t argc = 0;
    for (size_t off = 0; off < len;) {
        const char *ent = (const char *)payload + off;
        size_t el = strlen(ent);
        if (el > 0 && ent[0] == EXEC_ARG)
            argc++;
        off += el + 1;
    }
    if (argc == 0) {
        chan_send_error(&chan, stream, "malformed EXEC: no argv");
        chan_send_str(&chan, F_EXIT, stream, MALFORMED_EXEC_EXIT);
        return -1;
    }

    memset(req, 0, sizeof *req);
    req->argv = xrealloc(NULL, (argc + 1) * sizeof(char *));
    env_base(&req->env);
    req->grace_ms = DEFAULT_GRACE_MS;
    size_t ai = 0;
    for (size_t off = 0; off < len;) {
        const char *ent = (const char *)payload + off;
        size_t el = strlen(ent);
        off += el + 1;
        if (el == 0)
            continue;
        const char *val = ent + 1;
        switch (ent[0]) {
        case EXEC_ARG:
            req->argv[ai++] = (char *)val;
            break;
        case EXEC_ENV:
            env_set(&req->env, val);
            break;
        case EXEC_CWD:
            if (*val)
                req->cwd = val;
            break;
        case EXEC_TIMEOUT_MS:
            req->timeout_ms = parse_ms(val, 0);
            break;
        case EXEC_GRACE_MS:
            req->grace_ms = parse_ms(val, DEFAULT_GRACE_MS);
            break;
        case EXEC_STDIN:
            req->want_stdin = strcmp(val, "1") == 0;
            break;
        default:
            break;
        }
    }
    req->argv[ai] = NULL;
    return 0;
}

/* the command's pipes (each end close-on-exec): stdin (or /dev/null in inp[0]), stdout, stderr, and ep, which
 * carries the child's errno if it fails before exec; 0 or the errno */
static int exec_pipes(int want_stdin, int inp[2], int outp[2], int errp[2], int ep[2])
{
    if (want_stdin) {
        if (pipe2(inp, O_CLOEXEC) < 0)
            return errno;
    } else {
        inp[0] = open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (inp[0] < 0) {
            /* no /dev/null: an empty pipe gives EOF as well */
            if (pipe2(inp, O_CLOEXEC) < 0)
                return errno;
            xclose(&inp[1]);
        }
    }
    if (pipe2(outp, O_CLOEXEC) < 0 || pipe2(errp, O_CLOEXEC) < 0 || pipe2(ep, O_CLOEXEC) < 0)
        return errno;
    return 0;
}

/* vfork a child that becomes req's command with in_fd/out_fd/err_fd as 0/1/2 in its own session; if it cannot,
 * it writes its errno to ep_fd and exits EXIT_CODE_NOT_FOUND. The parent's pid of it, or -1 (errno set) */
static pid_t vfork_exec(const struct exec_req *req, int in_fd, int out_fd, int err_fd, int ep_fd)
{
    char **saved_environ = environ;
    /* vfork: under emulation copying the agent's page tables for fork is a large part of an exec's cost.
     * The child only makes system calls, then execs or _exits; we run again once it has. */
    pid_t pid = vfork();
    if (pid == 0) {
        /* child (sharing our memory until exec) */
        reset_signals_in_child();
        setsid();
        if (dup2(in_fd, 0) < 0 || dup2(out_fd, 1) < 0 || dup2(err_fd, 2) < 0)
            child_fail(ep_fd, errno);
        close_fds_except(ep_fd);
        if (req->cwd && chdir(req->cwd) < 0)
            child_fail(ep_fd, errno);
        environ = req->env.v; /* execvpe searches the PATH of environ */
        execvpe(req->argv[0], req->argv, req->env.v);
        child_fail(ep_fd, errno);
    }
    environ = saved_environ; /* the vfork child set it in our shared memory */
    return pid;
}

/* start req's command; on success *pid_out and fds (our ends: stdin writer or -1, stdout reader, stderr
 * reader) and 0, else the errno why not (the child's, if chdir or exec failed) */
static int spawn_exec(const struct exec_req *req, pid_t *pid_out, int fds[3])
{
    int inp[2] = {-1, -1}, outp[2] = {-1, -1}, errp[2] = {-1, -1}, ep[2] = {-1, -1};
    int err = exec_pipes(req->want_stdin, inp, outp, errp, ep);
    pid_t pid = -1;
    if (!err) {
        pid = vfork_exec(req, inp[0], outp[1], errp[1], ep[1]);
        if (pid < 0)
            err = errno;
    }
    xclose(&inp[0]);
    xclose(&outp[1]);
    xclose(&errp[1]);
    xclose(&ep[1]);

    if (!err) {
        /* the error pipe closes on exec (EOF: it ran) or carries the child's errno */
        int child_err = 0;
        ssize_t n;
        do {
            n = read(ep[0], &child_err, sizeof child_err);
        } while (n < 0 && errno == EINTR);
        if (n == (ssize_t)sizeof child_err) {
            int st;
            while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
            }
            err = child_err ? child_err : EINVAL;
        }
    }
    xclose(&ep[0]);

    if (err) {
        xclose(&inp[1]);
        xclose(&outp[0]);
        xclose(&errp[0]);
        return err;
    }
    *pid_out = pid;
    fds[0] = inp[1];
    fds[1] = outp[0];
    fds[2] = errp[0];
    return 0;
}

/* a started command becomes a session: its output is forwarded and its timeout runs from now */
static void register_session(uint32_t stream, pid_t pid, const int fds[3], int64_t timeout_ms, int64_t grace_ms)
{
    struct session *s = xrealloc(NULL, sizeof *s);
    memset(s, 0, sizeof *s);
    s->stream = stream;
    s->pid = pid;
    s->in_fd = fds[0];
    s->out_fd = fds[1];
    s->err_fd = fds[2];
    if (s->in_fd >= 0)
        set_nonblock(s->in_fd);
    set_nonblock(s->out_fd);
    set_nonblock(s->err_fd);
    s->grace_ms = grace_ms;
    if (timeout_ms > 0)
        s->deadline = mono_ms() + timeout_ms;
    s->next = execs.list;
    execs.list = s;
}

static void start_exec(uint32_t stream, const unsigned char *payload, size_t len)
{
    if (stream == 0) {
        chan_send_error(&chan, 0, "EXEC on stream 0");
        return;
    }
    if (find_session(stream)) {
        chan_send_error(&chan, stream, "stream %u is already running a command", stream);
        return;
    }
    struct exec_req req;
    if (parse_exec(stream, payload, len, &req) < 0)
        return;
    pid_t pid = -1;
    int fds[3];
    int err = spawn_exec(&req, &pid, fds);
    int64_t timeout_ms = req.timeout_ms, grace_ms = req.grace_ms;
    exec_req_free(&req);
    if (err) {
        exit_failed_to_start(stream, err);
        return;
    }
    register_session(stream, pid, fds, timeout_ms, grace_ms);
}

static void handle_stdin(uint32_t stream, const unsigned char *data, size_t len)
{
    struct session *s = find_session(stream);
    if (!s || s->in_fd < 0 || s->in_eof)
        return; /* gone, finished, or stdin is not a pipe: drop */
    if (len == 0) {
        s->in_eof = 1;
        flush_stdin(s);
        return;
    }
    queue_append(&s->in, data, len);
    execs.stdin_queued += len;
    flush_stdin(s);
}

static void handle_signal_frame(uint32_t stream, const unsigned char *data, size_t len)
{
    char buf[32];
    if (len == 0 || len >= sizeof buf) {
        chan_send_error(&chan, stream, "malformed SIGNAL");
        return;
    }
    memcpy(buf, data, len);
    buf[len] = '\0';
    char *end;
    long sig = strtol(buf, &end, 10);
    while (*end && isspace((unsigned char)*end))
        end++;
    if (end == buf || *end || sig <= 0 || sig >= NSIG) {
        chan_send_error(&chan, stream, "malformed SIGNAL: %s", buf);
        return;
    }
    struct session *s = find_session(stream);
    if (!s || s->exited)
        return;
    signal_group(s, (int)sig);
}

/* ---- child reaping ----------------------------------------------------------------------------------- */

static void on_child_exit(pid_t pid, int status)
{
    if (pid == console.pid) {
        console.pid = 0;
        if (!agent.halting) {
            int64_t now = mono_ms();
            console.respawn_at = console.last_spawn + 1000 > now ? console.last_spawn + 1000 : now;
        }
        return;
    }
    for (struct session *s = execs.list; s; s = s->next) {
        if (s->pid == pid && !s->exited) {
            s->exited = 1;
            s->wstatus = status;
            s->drain_until = mono_ms() + DRAIN_MS;
            close_stdin(s);
            return;
        }
    }
}

static int reap_children(void)
{
    int n = 0;
    for (;;) {
        int st;
        pid_t pid = waitpid(-1, &st, WNOHANG);
        if (pid < 0 && errno == EINTR)
            continue;
        if (pid <= 0)
            return pid < 0 && errno == ECHILD ? -1 : n;
        n++;
        on_child_exit(pid, st);
    }
}

static void drain_sigfd(void)
{
    struct signalfd_siginfo si;
    while (read(agent.sig_fd, &si, sizeof si) == (ssize_t)sizeof si) {
    }
}

/* ---- console shell ------------------------------------------------------------------------------------ */

static void spawn_shell(void)
{
    console.respawn_at = 0;
    if (!console.path || agent.halting)
        return;
    console.last_spawn = mono_ms();
    struct env env;
    env_base(&env);
    const char *base = strrchr(console.path, '/');
    base = base ? base + 1 : console.path;
    char argv0[256];
    snprintf(argv0, sizeof argv0, "-%s", base);
    pid_t pid = fork();
    if (pid < 0) {
        logmsg("fork for the console shell failed: %s", strerror(errno));
        console.respawn_at = mono_ms() + 1000;
        env_free(&env);
        return;
    }
    if (pid == 0) {
        reset_signals_in_child();
        setsid();
        int fd = open("/dev/ttyS0", O_RDWR);
        if (fd < 0)
            _exit(EXIT_CODE_NOT_FOUND);
        ioctl(fd, TIOCSCTTY, 1);
        dup2(fd, 0);
        dup2(fd, 1);
        dup2(fd, 2);
        close_fds_except(-1);
        if (chdir("/root") < 0 && chdir("/") < 0) {
            /* nothing better to do */
        }
        char *argv[] = {argv0, NULL};
        environ = env.v;
        execve(console.path, argv, env.v);
        _exit(EXIT_CODE_NOT_FOUND);
    }
    console.pid = pid;
    env_free(&env);
}

/* ---- CONFIG -------------------------------------------------------------------------------------------- */

/* bring the interface up (IFF_UP | IFF_RUNNING) or take it down */
static int iface_set(int sock, const char *name, int up)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
    if (ioctl(sock, SIOCGIFFLAGS, &ifr) < 0)
        return -1;
    if (up)
        ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    else
        ifr.ifr_flags &= ~IFF_UP;
    return ioctl(sock, SIOCSIFFLAGS, &ifr);
}

static void set_sin(struct sockaddr *sa, const char *ip)
{
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof sin);
    sin.sin_family = AF_INET;
    inet_pton(AF_INET, ip, &sin.sin_addr);
    memcpy(sa, &sin, sizeof sin);
}

static void configure_lo(void)
{
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0 || iface_set(sock, "lo", 1) < 0)
        logmsg("bringing up lo failed: %s", strerror(errno));
    if (sock >= 0)
        close(sock);
}

static void configure_user_net(char *out, size_t outlen)
{
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0) {
        snprintf(out, outlen, READY_ERROR "socket: %s", strerror(errno));
        return;
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, IFNAMSIZ, "eth0");
    /* the NIC may show up a moment after its driver was loaded */
    int64_t until = mono_ms() + 1000;
    while (ioctl(sock, SIOCGIFFLAGS, &ifr) < 0) {
        if (errno != ENODEV || mono_ms() >= until) {
            snprintf(out, outlen, READY_ERROR "eth0: %s", strerror(errno));
            close(sock);
            return;
        }
        sleep_ms(20);
    }
    set_sin(&ifr.ifr_addr, "10.0.2.15");
    if (ioctl(sock, SIOCSIFADDR, &ifr) < 0) {
        snprintf(out, outlen, READY_ERROR "eth0 address: %s", strerror(errno));
        close(sock);
        return;
    }
    set_sin(&ifr.ifr_netmask, "255.255.255.0");
    if (ioctl(sock, SIOCSIFNETMASK, &ifr) < 0) {
        snprintf(out, outlen, READY_ERROR "eth0 netmask: %s", strerror(errno));
        close(sock);
        return;
    }
    if (iface_set(sock, "eth0", 1) < 0) {
        snprintf(out, outlen, READY_ERROR "eth0 up: %s", strerror(errno));
        close(sock);
        return;
    }
    struct rtentry rt;
    memset(&rt, 0, sizeof rt);
    set_sin(&rt.rt_dst, "0.0.0.0");
    set_sin(&rt.rt_genmask, "0.0.0.0");
    set_sin(&rt.rt_gateway, "10.0.2.2");
    rt.rt_flags = RTF_UP | RTF_GATEWAY;
    char dev[] = "eth0";
    rt.rt_dev = dev;
    if (ioctl(sock, SIOCADDRT, &rt) < 0 && errno != EEXIST) {
        snprintf(out, outlen, READY_ERROR "default route: %s", strerror(errno));
        close(sock);
        return;
    }
    close(sock);
    snprintf(out, outlen, READY_OK);
}

/* lo and eth0 as CONFIG's network mode asks ("none": lo only); the verdict for READY into out */
static void configure_network(const char *net, char *out, size_t outlen)
{
    if (!agent.test_mode)
        configure_lo();
    if (!net || strcmp(net, NET_NONE) == 0)
        snprintf(out, outlen, READY_NONE);
    else if (strcmp(net, NET_USER) == 0 && agent.test_mode)
        snprintf(out, outlen, READY_ERROR "not supported in test mode");
    else if (strcmp(net, NET_USER) == 0)
        configure_user_net(out, outlen);
    else
        snprintf(out, outlen, READY_ERROR "unknown network mode %.100s", net);
}

/* At boot, so that a template snapshot holds it: lo, and eth0 when the shape has a NIC. Every VM of a shape has the
 * same NIC with the same address, each behind its own user-mode network, so a clone has nothing left to set up. */
static void boot_network(void)
{
    configure_lo();
    if (if_nametoindex("eth0") != 0)
        configure_user_net(agent.boot_net, sizeof agent.boot_net);
}

/* The first CONFIG's network: what boot_network did when it matches the mode asked for, else done now */
static void first_network(const char *net, char *out, size_t outlen)
{
    int user = net && strcmp(net, NET_USER) == 0;
    if (user && strcmp(agent.boot_net, READY_OK) == 0) {
        snprintf(out, outlen, READY_OK);
        return;
    }
    if (!user && agent.boot_net[0]) { /* a NIC without a user network: never by the shapes the host makes */
        int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (sock < 0 || iface_set(sock, "eth0", 0) < 0)
            logmsg("taking eth0 down: %s", strerror(errno));
        if (sock >= 0)
            close(sock);
    }
    configure_network(net, out, outlen);
}

/* A clone's first command paid ~30 ms more than later ones under emulation: the kernel's fork, exec and exit paths
 * are translated afresh in each new QEMU. A helper forked at boot (a template snapshot holds it, asleep) is woken by
 * the first CONFIG and forks a child that execs the agent's own binary, which exits at once: those paths are
 * translated on another vCPU while this one binds and mounts the root disk, and the fork is not this one's to pay.
 * Its exit is reaped like any unknown child's. */
static void start_warmer(void)
{
    int p[2];
    int exe = open("/proc/self/exe", O_RDONLY | O_CLOEXEC); /* exec'd by fd: /proc moves at the root's mount */
    if (exe < 0)
        return;
    if (pipe2(p, O_CLOEXEC) < 0) {
        close(exe);
        return;
    }
    pid_t pid = fork();
    if (pid == 0) {
        close(p[1]);
        reset_signals_in_child();
        int nfd = open("/dev/null", O_RDWR | O_CLOEXEC);
        if (nfd >= 0) {
            dup2(nfd, 0);
            dup2(nfd, 1);
            dup2(nfd, 2);
            close(nfd);
        }
        if (agent.log_fd >= 0)
            close(agent.log_fd);
        if (agent.sig_fd >= 0)
            close(agent.sig_fd);
        char c;
        while (read(p[0], &c, 1) < 0 && errno == EINTR)
            ;
        pid_t child = fork();
        if (child == 0) {
            char *const args[] = {AGENT_EXIT_ARG, AGENT_EXIT_ARG, NULL};
            char *const env[] = {NULL};
            fexecve(exe, args, env);
            _exit(0);
        }
        if (child > 0)
            while (waitpid(child, NULL, 0) < 0 && errno == EINTR)
                ;
        _exit(0);
    }
    close(p[0]);
    close(exe);
    if (pid > 0)
        agent.warm_fd = p[1];
    else
        close(p[1]);
}

static void wake_warmer(void)
{
    if (agent.warm_fd < 0)
        return;
    ssize_t w = write(agent.warm_fd, "", 1);
    (void)w;
    close(agent.warm_fd);
    agent.warm_fd = -1;
}

static void append_err(char *out, size_t outlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void append_err(char *out, size_t outlen, const char *fmt, ...)
{
    size_t used = strlen(out);
    if (used == 0) {
        snprintf(out, outlen, "%s", READY_ERROR);
        used = strlen(out);
    } else if (used + 2 < outlen) {
        strcat(out, "; ");
        used += 2;
    }
    if (used >= outlen)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(out + used, outlen - used, fmt, ap);
    va_end(ap);
}

/* "/dev/vdX" of the virtio disk whose serial (set by the host per disk) is want, waiting up to 2 s for it */
static int disk_by_serial(const char *want, char *out, size_t outlen)
{
    for (int tries = 0; tries < 200; tries++) {
        DIR *d = opendir("/sys/block");
        struct dirent *de;
        while (d && (de = readdir(d))) {
            if (de->d_name[0] == '.')
                continue;
            char path[512], buf[64];
            snprintf(path, sizeof path, "/sys/block/%s/serial", de->d_name);
            int fd = open(path, O_RDONLY | O_CLOEXEC);
            if (fd < 0)
                continue;
            ssize_t n = read(fd, buf, sizeof buf - 1);
            close(fd);
            if (n <= 0)
                continue;
            buf[n] = '\0';
            buf[strcspn(buf, "\r\n")] = '\0';
            if (strcmp(buf, want) == 0) {
                snprintf(out, outlen, "/dev/%s", de->d_name);
                closedir(d);
                return 0;
            }
        }
        if (d)
            closedir(d);
        usleep(10000);
    }
    return -1;
}

static void do_mount_entry(const char *spec, char *errs, size_t errlen)
{
    char buf[PATH_MAX * 2];
    snprintf(buf, sizeof buf, "%s", spec);
    char *f[4];
    int nf = 0;
    char *p = buf;
    while (nf < 4) {
        f[nf++] = p;
        char *tab = strchr(p, '\t');
        if (!tab)
            break;
        *tab = '\0';
        p = tab + 1;
    }
    if (nf != 4 || !*f[0] || !*f[1] || !*f[2] || strchr(f[3], '\t')) {
        append_err(errs, errlen, "malformed mount entry");
        return;
    }
    unsigned long flags = 0;
    if (strcmp(f[3], MOUNT_RO) == 0)
        flags |= MS_RDONLY;
    else if (strcmp(f[3], MOUNT_RW) != 0) {
        append_err(errs, errlen, "%s: bad mode %s", f[1], f[3]);
        return;
    }
    char dev[PATH_MAX];
    if (strncmp(f[0], MOUNT_SERIAL_PREFIX, strlen(MOUNT_SERIAL_PREFIX)) == 0) {
        if (disk_by_serial(f[0] + strlen(MOUNT_SERIAL_PREFIX), dev, sizeof dev) < 0) {
            append_err(errs, errlen, "%s: no disk with serial %s", f[1], f[0] + strlen(MOUNT_SERIAL_PREFIX));
            return;
        }
        f[0] = dev;
    }
    if (mkdir_p(f[1], 0755) < 0) {
        append_err(errs, errlen, "mkdir %s: %s", f[1], strerror(errno));
        return;
    }
    if (mount(f[0], f[1], f[2], flags, NULL) < 0) {
        append_err(errs, errlen, "%s: %s", f[1], strerror(errno));
        return;
    }
    logmsg("mounted %s on %s (%s, %s)", f[0], f[1], f[2], f[3]);
}

static void send_ready(void)
{
    char buf[4096];
    struct utsname u;
    if (uname(&u) < 0)
        snprintf(u.release, sizeof u.release, "unknown");
    /* the kernel again: a clone restored from a template said HELLO before this host was listening */
    snprintf(buf, sizeof buf,
             KEY_SHELL "=%s\n" KEY_NET "=%s\n" KEY_MOUNTS "=%s\n" KEY_MEDIATION "=%s\n" KEY_KERNEL "=%s\n" KEY_VERSION
             "=%d\n",
             config.ready_shell, config.ready_net, config.ready_mounts, config.ready_mediation, u.release,
             PROTOCOL_VERSION);
    chan_send_str(&chan, F_READY, 0, buf);
}

static void mount_root(void);

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* CONFIG's "t<sec>.<nsec>": the host's clock (a VM restored from a template resumes with the template's) */
static void apply_clock(const char *value)
{
    char *end = NULL;
    long long sec = strtoll(value, &end, 10);
    long nsec = 0;
    if (end && *end == '.')
        nsec = strtol(end + 1, NULL, 10);
    struct timespec ts = {.tv_sec = (time_t)sec, .tv_nsec = nsec >= 0 && nsec < 1000000000 ? nsec : 0};
    if (sec > 0 && clock_settime(CLOCK_REALTIME, &ts) < 0)
        logmsg("setting the clock failed: %s", strerror(errno));
}

/* CONFIG's "r<hex>": host randomness mixed into the kernel RNG, which is then reseeded (clones of one template
 * would otherwise share its RNG state) */
static void apply_seed(const char *hex)
{
    struct {
        struct rand_pool_info info;
        unsigned char buf[64];
    } e;
    size_t n = 0;
    for (; n < sizeof e.buf && hexval(hex[2 * n]) >= 0 && hexval(hex[2 * n + 1]) >= 0; n++)
        e.buf[n] = (unsigned char)(hexval(hex[2 * n]) << 4 | hexval(hex[2 * n + 1]));
    if (n == 0)
        return;
    e.info.entropy_count = (int)(n * 8);
    e.info.buf_size = (int)n;
    int fd = open("/dev/urandom", O_RDWR | O_CLOEXEC);
    if (fd < 0 || ioctl(fd, RNDADDENTROPY, &e) < 0 || ioctl(fd, RNDRESEEDCRNG) < 0)
        logmsg("reseeding the kernel RNG failed: %s", strerror(errno));
    if (fd >= 0)
        close(fd);
}

static void handle_config(uint32_t stream, const unsigned char *payload, size_t len)
{
    if (stream != 0) {
        chan_send_error(&chan, stream, "CONFIG must use stream 0");
        return;
    }
    if (len > 0 && payload[len - 1] != '\0') {
        chan_send_error(&chan, 0, "malformed CONFIG: entries are not NUL-terminated");
        return;
    }
    const char *hostname = NULL, *net = NULL, *shell = NULL, *med_value = NULL, *clock = NULL, *seed = NULL;
    size_t nmounts = 0;
    env_clear(&config.env);
    for (size_t off = 0; off < len;) {
        const char *ent = (const char *)payload + off;
        size_t el = strlen(ent);
        off += el + 1;
        if (el == 0)
            continue;
        const char *val = ent + 1;
        switch (ent[0]) {
        case CFG_HOSTNAME:
            hostname = val;
            break;
        case CFG_ENV:
            env_set(&config.env, val);
            break;
        case CFG_NETWORK:
            net = val;
            break;
        case CFG_SHELL:
            shell = val;
            break;
        case CFG_MOUNT:
            nmounts++;
            break;
        case CFG_MEDIATION_PORT:
            med_value = val;
            break;
        case CFG_CLOCK:
            clock = val;
            break;
        case CFG_SEED:
            seed = val;
            break;
        default:
            break;
        }
    }

    if (hostname && *hostname && !agent.test_mode) {
        if (sethostname(hostname, strlen(hostname)) < 0)
            logmsg("sethostname(%s) failed: %s", hostname, strerror(errno));
    }

    /* identity of this boot: a clone of a template, or of a workspace snapshot (whose first CONFIG was applied
     * before it was saved), resumes with the clock and RNG state it was saved with */
    if (!agent.test_mode) {
        if (clock)
            apply_clock(clock);
        if (seed)
            apply_seed(seed);
    }

    if (config.applied) {
        /* a restored snapshot: env, hostname, clock and seed are updated, the rest was applied at the first CONFIG */
        send_ready();
        return;
    }
    config.applied = 1;
    if (agent.is_pid1 && !agent.test_mode) {
        wake_warmer();
        first_network(net, config.ready_net, sizeof config.ready_net);
        mount_root();
    } else
        configure_network(net, config.ready_net, sizeof config.ready_net);
    if (strcmp(config.ready_net, READY_OK) != 0 && strcmp(config.ready_net, READY_NONE) != 0)
        logmsg("network: %s", config.ready_net);

    /* mounts */
    if (nmounts > 0 && agent.test_mode) {
        snprintf(config.ready_mounts, sizeof config.ready_mounts, READY_ERROR "not supported in test mode");
    } else {
        char errs[sizeof config.ready_mounts] = "";
        for (size_t off = 0; off < len;) {
            const char *ent = (const char *)payload + off;
            size_t el = strlen(ent);
            off += el + 1;
            if (el > 0 && ent[0] == CFG_MOUNT)
                do_mount_entry(ent + 1, errs, sizeof errs);
        }
        if (errs[0]) {
            snprintf(config.ready_mounts, sizeof config.ready_mounts, "%s", errs);
            logmsg("mounts: %s", errs);
        } else
            snprintf(config.ready_mounts, sizeof config.ready_mounts, READY_OK);
    }

    /* mediation listener and channel (after the network: lo is up) */
    med_setup(med_value);

    /* console shell */
    snprintf(config.ready_shell, sizeof config.ready_shell, READY_MISSING);
    if (shell && *shell && !agent.test_mode && access(shell, X_OK) == 0 && access("/dev/ttyS0", F_OK) == 0) {
        free(console.path);
        console.path = xstrdup(shell);
        spawn_shell();
        snprintf(config.ready_shell, sizeof config.ready_shell, READY_OK);
    }

    send_ready();
}

/* ---- HALT ----------------------------------------------------------------------------------------------- */

static void unescape_mount_path(char *s)
{
    char *w = s;
    for (char *r = s; *r;) {
        if (r[0] == '\\' && r[1] >= '0' && r[1] <= '7' && r[2] >= '0' && r[2] <= '7' && r[3] >= '0' &&
            r[3] <= '7') {
            *w++ = (char)((r[1] - '0') * 64 + (r[2] - '0') * 8 + (r[3] - '0'));
            r += 4;
        } else
            *w++ = *r++;
    }
    *w = '\0';
}

static void unmount_all(void)
{
    FILE *f = fopen("/proc/mounts", "re");
    if (!f) {
        logmsg("cannot read /proc/mounts: %s", strerror(errno));
        return;
    }
    char **targets = NULL;
    size_t n = 0, cap = 0;
    char line[4096];
    while (fgets(line, sizeof line, f)) {
        char *sp1 = strchr(line, ' ');
        if (!sp1)
            continue;
        char *target = sp1 + 1;
        char *sp2 = strchr(target, ' ');
        if (!sp2)
            continue;
        *sp2 = '\0';
        unescape_mount_path(target);
        if (strcmp(target, "/") == 0)
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 32;
            targets = xrealloc(targets, cap * sizeof(char *));
        }
        targets[n++] = xstrdup(target);
    }
    fclose(f);
    while (n > 0) {
        n--;
        if (umount2(targets[n], 0) < 0 && umount2(targets[n], MNT_DETACH) < 0)
            logmsg("unmounting %s failed: %s", targets[n], strerror(errno));
        free(targets[n]);
    }
    free(targets);
    if (mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY, NULL) < 0)
        logmsg("remounting / read-only failed: %s", strerror(errno));
}

/* wait until no children are left (-1 = all reaped) or the deadline passes */
static void wait_children_until(int64_t deadline, int only_sessions)
{
    for (;;) {
        int r = reap_children();
        if (r < 0)
            return; /* ECHILD: nothing left */
        if (only_sessions) {
            int alive = console.pid > 0;
            for (struct session *s = execs.list; s; s = s->next)
                if (!s->exited)
                    alive = 1;
            if (!alive)
                return;
        }
        int64_t now = mono_ms();
        if (now >= deadline)
            return;
        struct pollfd pf = {.fd = agent.sig_fd, .events = POLLIN};
        int64_t left = deadline - now;
        if (left > 50)
            left = 50; /* also catches children that exit without a SIGCHLD being queued */
        poll(&pf, 1, (int)left);
        drain_sigfd();
    }
}

static void power_off(void)
{
    sync();
    if (agent.is_pid1) {
        reboot(RB_POWER_OFF);
        logmsg("reboot(RB_POWER_OFF) failed: %s", strerror(errno));
        for (;;)
            pause();
    }
    exit(1);
}

static void do_halt(uint32_t stream, const unsigned char *data, size_t len)
{
    char mode[16];
    while (len > 0 && isspace(data[len - 1]))
        len--;
    if (stream != 0 || len == 0 || len >= sizeof mode) {
        chan_send_error(&chan, stream, "malformed HALT");
        return;
    }
    memcpy(mode, data, len);
    mode[len] = '\0';
    int graceful;
    if (strcmp(mode, HALT_HALT) == 0)
        graceful = 1;
    else if (strcmp(mode, HALT_POWEROFF) == 0)
        graceful = 0;
    else {
        chan_send_error(&chan, 0, "unknown HALT mode: %s", mode);
        return;
    }
    chan_send_str(&chan, F_HALTING, 0, "");
    agent.halting = 1;
    int64_t wait_ms = graceful ? HALT_WAIT_MS : POWEROFF_WAIT_MS;
    logmsg("%s requested", mode);

    if (agent.test_mode) {
        /* only our own children: never kill(-1) on the host */
        for (struct session *s = execs.list; s; s = s->next)
            if (!s->exited)
                signal_group(s, SIGTERM);
        if (console.pid > 0)
            kill(console.pid, SIGTERM);
        wait_children_until(mono_ms() + wait_ms, 1);
        for (struct session *s = execs.list; s; s = s->next)
            if (!s->exited)
                signal_group(s, SIGKILL);
        if (console.pid > 0)
            kill(console.pid, SIGKILL);
        wait_children_until(mono_ms() + 500, 1);
        xclose(&chan.fd);
        exit(0);
    }

    /* an interactive console shell ignores SIGTERM; it holds nothing worth waiting for */
    if (console.pid > 0)
        kill(-console.pid, SIGKILL);
    kill(-1, SIGTERM);
    wait_children_until(mono_ms() + wait_ms, 0);
    kill(-1, SIGKILL);
    wait_children_until(mono_ms() + 1000, 0);
    sync();
    if (graceful)
        unmount_all();
    power_off();
}

/* ---- the agent channel: frames from the host ------------------------------------------------------- */

static void pub_dispatch(int type, uint32_t stream, const unsigned char *p, size_t len);
static void pub_lost(void);

static void test_mode_exit(int code)
{
    for (struct session *s = execs.list; s; s = s->next)
        if (!s->exited)
            signal_group(s, SIGKILL);
    exit(code);
}

/* the agent channel closed: in test mode the agent exits (there is nobody to serve) */
static void main_chan_lost(const char *why)
{
    pub_lost();
    if (agent.test_mode) {
        logmsg("channel closed (%s), exiting", why);
        test_mode_exit(0);
    }
}

static void dispatch(int type, uint32_t stream, const unsigned char *p, size_t len)
{
    switch (type) {
    case F_CONFIG:
        handle_config(stream, p, len);
        break;
    case F_EXEC:
        start_exec(stream, p, len);
        break;
    case F_STDIN:
        handle_stdin(stream, p, len);
        break;
    case F_SIGNAL:
        handle_signal_frame(stream, p, len);
        break;
    case F_HALT:
        do_halt(stream, p, len);
        break;
    case F_PING:
        chan_send(&chan, F_PONG, stream, p, len);
        break;
    case F_POPEN:
    case F_PDATA:
    case F_PACK:
    case F_PEOF:
    case F_PCLOSE:
        pub_dispatch(type, stream, p, len);
        break;
    case F_ERROR:
        logmsg("host reported an error on stream %u: %.*s", stream, (int)(len > 500 ? 500 : len), (const char *)p);
        break;
    default:
        chan_send_error(&chan, stream, "unexpected frame type 0x%02x", type);
        break;
    }
}

/* ---- mediation bridge ---------------------------------------------------------------------------------------- */

/* close the guest socket (reading away what the program sent, so the close is a FIN, not a RST that could
 * destroy the bytes it has not read yet); with notify, tell the host with MCLOSE <reason> */
static void mconn_close(struct mconn *c, int notify, const char *reason)
{
    if (c->dead)
        return;
    c->dead = 1;
    if (c->fd >= 0) {
        char tmp[4096];
        for (int i = 0; i < 64 && read(c->fd, tmp, sizeof tmp) > 0; i++) {
        }
        xclose(&c->fd);
    }
    queue_free(&c->out);
    if (notify)
        chan_send(&med_chan, F_MCLOSE, c->id, reason ? reason : "", reason ? strlen(reason) : 0);
}

static void med_close_all(int notify, const char *reason)
{
    for (struct mconn *c = med.conns; c; c = c->next)
        if (!c->dead)
            mconn_close(c, notify && !c->closing, reason);
}

static void med_sweep(void)
{
    for (struct mconn **pp = &med.conns; *pp;) {
        struct mconn *c = *pp;
        if (c->dead) {
            *pp = c->next;
            free(c);
        } else
            pp = &c->next;
    }
}

static struct mconn *med_find(uint32_t id)
{
    for (struct mconn *c = med.conns; c; c = c->next)
        if (!c->dead && c->id == id)
            return c;
    return NULL;
}

static uint32_t med_alloc_id(void)
{
    for (;;) {
        uint32_t id = med.next_id++;
        if (med.next_id == 0)
            med.next_id = 1;
        if (id != 0 && !med_find(id))
            return id;
    }
}

/* the mediation channel closed: every guest connection goes with it (no frames); in test mode it stays closed */
static void med_chan_lost(const char *why)
{
    med_close_all(0, NULL);
    if (agent.test_mode)
        logmsg("mediation channel closed (%s); guest connections are refused from now on", why);
}

/* a guest program wrote something (or closed its end) */
static void mconn_read(struct mconn *c)
{
    static char buf[OUT_CHUNK];
    ssize_t n = read(c->fd, buf, sizeof buf);
    if (n > 0) {
        chan_send(&med_chan, F_MDATA, c->id, buf, (size_t)n);
        return;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (n == 0) { /* half-close: the program may still be waiting for the answer */
        c->rd_eof = 1;
        chan_send(&med_chan, F_MEOF, c->id, "", 0);
        return;
    }
    char why[128];
    snprintf(why, sizeof why, "read: %s", strerror(errno));
    mconn_close(c, 1, why);
}

/* write what the host sent to the guest program, as far as the socket takes it */
static void mconn_flush(struct mconn *c)
{
    while (!c->dead && c->out.off < c->out.len) {
        ssize_t n = send(c->fd, c->out.buf + c->out.off, c->out.len - c->out.off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            c->out.off += (size_t)n;
            if (c->over_since)
                c->over_since = mono_ms(); /* progress: restart the stall clock */
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        char why[128];
        snprintf(why, sizeof why, "write: %s", n < 0 ? strerror(errno) : "no progress");
        mconn_close(c, !c->closing, why);
        return;
    }
    if (c->dead)
        return;
    if (c->out.off == c->out.len) {
        c->out.off = c->out.len = 0;
        if (c->closing) {
            mconn_close(c, 0, NULL);
            return;
        }
    }
    if (queue_pending(&c->out) < MED_BUF_CAP)
        c->over_since = 0;
}

static void med_accept(void)
{
    for (int i = 0; i < MED_ACCEPT_BATCH && med.listen_fd >= 0; i++) {
        int fd = accept4(med.listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                logmsg("mediation accept: %s", strerror(errno));
            return;
        }
        if (med_chan.fd < 0 || med.cut) {
            close(fd); /* cut, or no host to talk to: the program sees its connection closed at once */
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct mconn *c = xrealloc(NULL, sizeof *c);
        memset(c, 0, sizeof *c);
        c->fd = fd;
        c->id = med_alloc_id();
        c->next = med.conns;
        med.conns = c;
        chan_send(&med_chan, F_MOPEN, c->id, NULL, 0);
    }
}

static void med_data(uint32_t stream, const unsigned char *p, size_t len)
{
    struct mconn *c = med_find(stream);
    if (!c || c->closing || len == 0)
        return; /* already closed (frames crossing), or nothing to do */
    queue_append(&c->out, p, len);
    if (!c->over_since && queue_pending(&c->out) >= MED_BUF_CAP)
        c->over_since = mono_ms();
    mconn_flush(c);
}

static void med_dispatch(int type, uint32_t stream, const unsigned char *p, size_t len)
{
    switch (type) {
    case F_MDATA:
    case F_MCLOSE:
        if (stream == 0) {
            chan_send_error(&med_chan, 0, "%s on stream 0", type == F_MDATA ? "MDATA" : "MCLOSE");
            break;
        }
        if (type == F_MDATA) {
            med_data(stream, p, len);
        } else {
            struct mconn *c = med_find(stream);
            if (c && !c->closing) {
                c->closing = 1;
                mconn_flush(c); /* closes it once everything queued is written */
            }
        }
        break;
    case F_MCUT:
    case F_MRESUME:
        if (stream != 0) {
            chan_send_error(&med_chan, stream, "%s must use stream 0", type == F_MCUT ? "MCUT" : "MRESUME");
            break;
        }
        if (type == F_MCUT) {
            if (!med.cut)
                logmsg("mediation cut");
            med.cut = 1;
            med_close_all(1, REASON_CUT);
        } else {
            if (med.cut)
                logmsg("mediation resumed");
            med.cut = 0;
        }
        break;
    case F_PING:
        chan_send(&med_chan, F_PONG, stream, p, len);
        break;
    case F_ERROR:
        logmsg("host reported a mediation error on stream %u: %.*s", stream, (int)(len > 500 ? 500 : len),
               (const char *)p);
        break;
    default:
        chan_send_error(&med_chan, stream, "unexpected frame type 0x%02x on the mediation channel", type);
        break;
    }
}

static int med_listen(int port, char *err, size_t errlen)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        return -1;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof sin);
    sin.sin_family = AF_INET;
    sin.sin_port = htons((uint16_t)port);
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&sin, sizeof sin) < 0 || listen(fd, 128) < 0) {
        snprintf(err, errlen, "listen 127.0.0.1:%d: %s", port, strerror(errno));
        close(fd);
        return -1;
    }
    med.listen_fd = fd;
    return 0;
}

/* CONFIG's p<port> entry (NULL: none), applied once, at the first CONFIG; sets config.ready_mediation */
static void med_setup(const char *value)
{
    if (!value) {
        snprintf(config.ready_mediation, sizeof config.ready_mediation, READY_NONE);
        return;
    }
    char *end;
    errno = 0;
    long port = strtol(value, &end, 10);
    if (errno || end == value || *end || port < 1 || port > 65535 || !isdigit((unsigned char)value[0])) {
        snprintf(config.ready_mediation, sizeof config.ready_mediation, READY_ERROR "bad port %.100s", value);
        logmsg("mediation: %s", config.ready_mediation);
        return;
    }
    char err[400];
    if (agent.test_mode) {
        if (!agent.med_connect_path) {
            snprintf(config.ready_mediation, sizeof config.ready_mediation,
                     READY_ERROR "no mediation port (no --mediation-connect)");
            return;
        }
        if (chan_connect_unix(&med_chan, agent.med_connect_path, err, sizeof err) < 0) {
            snprintf(config.ready_mediation, sizeof config.ready_mediation, READY_ERROR "%s", err);
            logmsg("mediation: %s", config.ready_mediation);
            return;
        }
    } else {
        /* the ports of one virtio-serial device appear together, but give a late one a moment */
        int64_t until = mono_ms() + 1000;
        while (chan_find_port(&med_chan) < 0) {
            if (mono_ms() >= until) {
                snprintf(config.ready_mediation, sizeof config.ready_mediation, READY_ERROR "no mediation port");
                logmsg("mediation: virtio-serial port %s not found", MEDIATION_PORT_NAME);
                return;
            }
            sleep_ms(20);
        }
    }
    if (med_listen((int)port, err, sizeof err) < 0) {
        snprintf(config.ready_mediation, sizeof config.ready_mediation, READY_ERROR "%s", err);
        logmsg("mediation: %s", config.ready_mediation);
        xclose(&med_chan.fd);
        return;
    }
    med.port = (int)port;
    if (!agent.test_mode)
        chan_open_port(&med_chan); /* if the host is not connected yet, retried every PORT_RETRY_MS */
    snprintf(config.ready_mediation, sizeof config.ready_mediation, READY_OK);
    logmsg("mediation: listening on 127.0.0.1:%d", med.port);
}

/* timers: reopening the port, closing connections whose program stopped reading */
static void med_timers(int64_t now)
{
    chan_timers(&med_chan, now);
    for (struct mconn *c = med.conns; c; c = c->next) {
        if (!c->dead && c->over_since && now - c->over_since >= MED_STALL_MS)
            mconn_close(c, !c->closing, REASON_BUFFER_OVERFLOW);
    }
}

static int64_t med_next_deadline(void)
{
    int64_t next = chan_next_deadline(&med_chan);
    for (struct mconn *c = med.conns; c; c = c->next) {
        if (!c->dead && c->over_since) {
            int64_t t = c->over_since + MED_STALL_MS;
            if (next < 0 || t < next)
                next = t;
        }
    }
    return next;
}

/* ---- published ports (host -> guest TCP) ------------------------------------------------------------------ */

/* The host asks (POPEN on a stream it chose, payload: the guest port) for a connection to 127.0.0.1:<port> in the
 * guest; bytes flow as PDATA both ways, each way within a window of PUBLISH_WINDOW unacknowledged bytes (PACK
 * returns credit), PEOF is a half-close, PCLOSE ends the stream (answered with PCLOSE unless we sent one). */

#define PUB_ACK_MIN (PUBLISH_WINDOW / 4u) /* acknowledge written bytes at least this often */

struct pconn {
    struct pconn *next;
    uint32_t stream;
    int fd;
    int connecting;         /* non-blocking connect in progress */
    int rd_eof;             /* the guest program finished sending: PEOF sent */
    int host_eof;           /* the host sent PEOF: shut our write side once the queue is written */
    int wr_shut;            /* shutdown(SHUT_WR) done */
    int dead;               /* closed; freed at the top of the main loop */
    struct wqueue out;      /* host -> guest bytes not yet written */
    size_t credit;          /* guest -> host bytes we may still send before the host acknowledges */
    size_t written_unacked; /* host bytes written to the program and not yet acknowledged (PACK) */
};

static struct {
    struct pconn *list;
    size_t n;
} ports;

static struct pconn *pub_find(uint32_t stream)
{
    for (struct pconn *c = ports.list; c; c = c->next)
        if (!c->dead && c->stream == stream)
            return c;
    return NULL;
}

/* close the guest socket; with notify, PCLOSE <reason> to the host */
static void pub_close(struct pconn *c, int notify, const char *reason)
{
    if (c->dead)
        return;
    c->dead = 1;
    ports.n--;
    xclose(&c->fd);
    queue_free(&c->out);
    if (notify)
        chan_send(&chan, F_PCLOSE, c->stream, reason ? reason : "", reason ? strlen(reason) : 0);
}

static void pub_sweep(void)
{
    for (struct pconn **pp = &ports.list; *pp;) {
        struct pconn *c = *pp;
        if (c->dead) {
            *pp = c->next;
            free(c);
        } else
            pp = &c->next;
    }
}

/* the agent channel closed: every published-port connection goes with it (no frames) */
static void pub_lost(void)
{
    for (struct pconn *c = ports.list; c; c = c->next)
        pub_close(c, 0, NULL);
}

static void pub_close_errno(struct pconn *c, const char *what, int err)
{
    char why[160];
    snprintf(why, sizeof why, "%s: %s", what, strerror(err));
    pub_close(c, 1, why);
}

/* both directions finished: close and tell the host */
static void pub_maybe_finish(struct pconn *c)
{
    if (!c->dead && c->rd_eof && c->wr_shut)
        pub_close(c, 1, NULL);
}

static void pub_ack(struct pconn *c)
{
    char buf[24];
    snprintf(buf, sizeof buf, "%zu", c->written_unacked);
    c->written_unacked = 0;
    chan_send_str(&chan, F_PACK, c->stream, buf);
}

/* write what the host sent to the program, as far as the socket takes it; acknowledge it; half-close after */
static void pub_flush(struct pconn *c)
{
    if (c->dead || c->connecting)
        return;
    while (c->out.off < c->out.len) {
        ssize_t n = send(c->fd, c->out.buf + c->out.off, c->out.len - c->out.off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            c->out.off += (size_t)n;
            c->written_unacked += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        pub_close_errno(c, "write", n < 0 ? errno : EPIPE);
        return;
    }
    if (c->out.off == c->out.len)
        c->out.off = c->out.len = 0;
    if (c->written_unacked && (c->written_unacked >= PUB_ACK_MIN || queue_pending(&c->out) == 0))
        pub_ack(c);
    if (c->host_eof && !c->wr_shut && queue_pending(&c->out) == 0) {
        shutdown(c->fd, SHUT_WR);
        c->wr_shut = 1;
        pub_maybe_finish(c);
    }
}

/* the program sent something (or finished sending) */
static void pub_read(struct pconn *c)
{
    static char buf[OUT_CHUNK];
    size_t want = c->credit < sizeof buf ? c->credit : sizeof buf;
    if (want == 0)
        return;
    ssize_t n = read(c->fd, buf, want);
    if (n > 0) {
        c->credit -= (size_t)n;
        chan_send(&chan, F_PDATA, c->stream, buf, (size_t)n);
        return;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (n == 0) {
        c->rd_eof = 1;
        chan_send(&chan, F_PEOF, c->stream, "", 0);
        pub_maybe_finish(c);
        return;
    }
    pub_close_errno(c, "read", errno);
}

static void pub_open(uint32_t stream, const unsigned char *p, size_t len)
{
    char buf[8];
    if (stream == 0) {
        chan_send_error(&chan, 0, "POPEN on stream 0");
        return;
    }
    if (pub_find(stream)) {
        chan_send_error(&chan, stream, "stream %u is already a published-port connection", stream);
        return;
    }
    long port = 0;
    if (len > 0 && len < sizeof buf) {
        memcpy(buf, p, len);
        buf[len] = '\0';
        char *end = buf;
        port = isdigit((unsigned char)buf[0]) ? strtol(buf, &end, 10) : 0;
        if (*end)
            port = 0;
    }
    if (port < 1 || port > 65535) {
        chan_send_str(&chan, F_PCLOSE, stream, "malformed POPEN: the payload is a port number 1-65535");
        return;
    }
    if (ports.n >= PUB_MAX_CONNS) {
        chan_send_str(&chan, F_PCLOSE, stream, REASON_TOO_MANY);
        return;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        char why[160];
        snprintf(why, sizeof why, "socket: %s", strerror(errno));
        chan_send_str(&chan, F_PCLOSE, stream, why);
        return;
    }
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof sin);
    sin.sin_family = AF_INET;
    sin.sin_port = htons((uint16_t)port);
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int r;
    do {
        r = connect(fd, (struct sockaddr *)&sin, sizeof sin);
    } while (r < 0 && errno == EINTR);
    if (r < 0 && errno != EINPROGRESS) {
        char why[160];
        snprintf(why, sizeof why, "connect 127.0.0.1:%ld: %s", port, strerror(errno));
        close(fd);
        chan_send_str(&chan, F_PCLOSE, stream, why);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct pconn *c = xrealloc(NULL, sizeof *c);
    memset(c, 0, sizeof *c);
    c->stream = stream;
    c->fd = fd;
    c->connecting = r < 0;
    c->credit = PUBLISH_WINDOW;
    c->next = ports.list;
    ports.list = c;
    ports.n++;
}

static void pub_dispatch(int type, uint32_t stream, const unsigned char *p, size_t len)
{
    if (type == F_POPEN) {
        pub_open(stream, p, len);
        return;
    }
    struct pconn *c = pub_find(stream);
    if (!c)
        return; /* finished (frames crossing our PCLOSE) or never opened */
    if (type == F_PDATA) {
        if (c->host_eof || len == 0)
            return;
        if (queue_pending(&c->out) + len > PUBLISH_WINDOW) {
            pub_close(c, 1, "protocol: PDATA beyond the window");
            return;
        }
        queue_append(&c->out, p, len);
        pub_flush(c);
    } else if (type == F_PACK) {
        char buf[16];
        size_t n = len < sizeof buf - 1 ? len : sizeof buf - 1;
        memcpy(buf, p, n);
        buf[n] = '\0';
        long long v = strtoll(buf, NULL, 10);
        if (v > 0) {
            c->credit += (size_t)v;
            if (c->credit > PUBLISH_WINDOW)
                c->credit = PUBLISH_WINDOW;
        }
    } else if (type == F_PEOF) {
        c->host_eof = 1;
        pub_flush(c);
    } else if (type == F_PCLOSE) {
        pub_close(c, 1, NULL); /* the answer frees the stream on the host */
    }
}

/* poll events for c (0: not polled now) */
static short pub_events(const struct pconn *c)
{
    if (c->dead)
        return 0;
    if (c->connecting)
        return POLLOUT;
    return (short)((!c->rd_eof && c->credit > 0 ? POLLIN : 0) | (queue_pending(&c->out) ? POLLOUT : 0));
}

static void pub_ready(struct pconn *c, short re)
{
    if (c->connecting) {
        int err = 0;
        socklen_t el = sizeof err;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el) < 0)
            err = errno;
        if (err) {
            pub_close_errno(c, "connect", err);
            return;
        }
        c->connecting = 0;
        pub_flush(c);
        return;
    }
    /* read first: what the program sent is forwarded even if writing to it fails next */
    if (!c->rd_eof && c->credit > 0 && (re & (POLLIN | POLLHUP | POLLERR)))
        pub_read(c);
    if (!c->dead && (re & POLLOUT))
        pub_flush(c);
    if (!c->dead && (re & (POLLERR | POLLNVAL))) {
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        pub_close_errno(c, "socket", err ? err : ECONNRESET);
    }
}

/* ---- boot (PID 1) ---------------------------------------------------------------------------------------- */

static void fatal_boot(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void fatal_boot(const char *fmt, ...)
{
    char buf[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    logmsg("fatal: %s; powering off", buf);
    sync();
    reboot(RB_POWER_OFF);
    for (;;)
        pause();
}

static void ensure_std_fds(const char *dev)
{
    for (int fd = 0; fd < 3; fd++) {
        if (fcntl(fd, F_GETFD) >= 0)
            continue;
        int nfd = open(dev, O_RDWR | O_NOCTTY);
        if (nfd < 0)
            nfd = open("/dev/null", O_RDWR);
        if (nfd < 0)
            return;
        if (nfd != fd) {
            dup2(nfd, fd);
            close(nfd);
        }
    }
}

static void try_mount(const char *src, const char *target, const char *type, unsigned long flags, const char *data)
{
    if (mkdir(target, 0755) < 0 && errno != EEXIST)
        logmsg("mkdir %s: %s", target, strerror(errno));
    if (mount(src, target, type, flags, data) < 0 && errno != EBUSY)
        logmsg("mounting %s on %s failed: %s", type, target, strerror(errno));
}

/* The disk driver is loaded at boot but bound at the first CONFIG: a template snapshot taken at HELLO has its code
 * relocated and linked (slow under emulation) yet has probed no disk, so a clone probes its own disks (their sizes,
 * their serials). The virtio bus's autoprobe is off while it loads. The NIC is bound at boot: it is the same device
 * with the same address in every VM of a machine shape (each has its own user-mode network). */
#define VIRTIO_BUS "/sys/bus/virtio"

static int late_module(const char *path)
{
    return strstr(path, "/virtio_blk.ko") != NULL;
}

static int write_sys(const char *path, const char *value)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    int ok = fd >= 0 && write(fd, value, strlen(value)) >= 0;
    if (!ok)
        logmsg("writing %s to %s: %s", value, path, strerror(errno));
    if (fd >= 0)
        close(fd);
    return ok ? 0 : -1;
}

static void load_modules(int late)
{
    FILE *f = fopen("/" MODULES_ORDER, "re");
    if (!f)
        return;
    char line[PATH_MAX];
    while (fgets(line, sizeof line, f)) {
        size_t n = strlen(line);
        while (n > 0 && isspace((unsigned char)line[n - 1]))
            line[--n] = '\0';
        char *p = line;
        while (*p && isspace((unsigned char)*p))
            p++;
        if (!*p || *p == '#')
            continue;
        char path[PATH_MAX + 2];
        snprintf(path, sizeof path, "%s%s", *p == '/' ? "" : "/", p);
        if (late_module(path) != late)
            continue;
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            logmsg("module %s: %s", path, strerror(errno));
            continue;
        }
        if (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST)
            logmsg("loading module %s failed: %s", path, strerror(errno));
        close(fd);
    }
    fclose(f);
}

/* bind every virtio device still without a driver (the disks, left unprobed at boot), in the bus's order (virtio0,
 * virtio1, ...), as loading the driver would: the first disk bound is /dev/vda (microvm has 24 virtio transports) */
static void bind_late_devices(void)
{
    write_sys(VIRTIO_BUS "/drivers_autoprobe", "1");
    DIR *d = opendir(VIRTIO_BUS "/devices");
    if (!d) {
        logmsg("%s: %s", VIRTIO_BUS "/devices", strerror(errno));
        return;
    }
    enum { MAX_LATE = 64 };
    long ids[MAX_LATE];
    size_t n = 0;
    struct dirent *de;
    while ((de = readdir(d)) && n < MAX_LATE) {
        char *end;
        if (strncmp(de->d_name, "virtio", 6) != 0)
            continue;
        long id = strtol(de->d_name + 6, &end, 10);
        if (*end || end == de->d_name + 6)
            continue;
        char drv[PATH_MAX];
        snprintf(drv, sizeof drv, VIRTIO_BUS "/devices/%s/driver", de->d_name);
        if (access(drv, F_OK) != 0)
            ids[n++] = id;
    }
    closedir(d);
    for (size_t i = 1; i < n; i++) /* a handful: insertion sort */
        for (size_t j = i; j > 0 && ids[j - 1] > ids[j]; j--) {
            long t = ids[j];
            ids[j] = ids[j - 1];
            ids[j - 1] = t;
        }
    for (size_t i = 0; i < n; i++) {
        char name[32];
        snprintf(name, sizeof name, "virtio%ld", ids[i]);
        write_sys(VIRTIO_BUS "/drivers_probe", name);
    }
}

static void delete_tree(int dfd, dev_t rootdev, int top)
{
    DIR *d = fdopendir(dfd);
    if (!d) {
        close(dfd);
        return;
    }
    struct dirent *de;
    while ((de = readdir(d))) {
        const char *name = de->d_name;
        if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
            continue;
        if (top && strcmp(name, "newroot") == 0)
            continue;
        struct stat st;
        if (fstatat(dirfd(d), name, &st, AT_SYMLINK_NOFOLLOW) < 0 || st.st_dev != rootdev)
            continue;
        if (S_ISDIR(st.st_mode)) {
            int sub = openat(dirfd(d), name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (sub >= 0)
                delete_tree(sub, rootdev, 0);
            unlinkat(dirfd(d), name, AT_REMOVEDIR);
        } else {
            unlinkat(dirfd(d), name, 0);
        }
    }
    closedir(d);
}

/* free the initramfs's files (like switch_root), only if / really is a ramfs/tmpfs: at boot once every module is
 * loaded (a template snapshot then holds none of them), and at the root's mount */
static void free_initramfs(void)
{
    struct statfs sfs;
    struct stat rst;
    if (statfs("/", &sfs) == 0 && (sfs.f_type == (typeof(sfs.f_type))RAMFS_MAGIC ||
                                   sfs.f_type == (typeof(sfs.f_type))TMPFS_MAGIC) &&
        stat("/", &rst) == 0) {
        int dfd = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0)
            delete_tree(dfd, rst.st_dev, 1);
    }
}

static void boot(void)
{
    try_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    try_mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    try_mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    ensure_std_fds("/dev/console");
    agent.log_fd = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);

    load_modules(0);
    if (write_sys(VIRTIO_BUS "/drivers_autoprobe", "0") == 0) { /* else the driver loads at CONFIG */
        load_modules(1);
        agent.disks_loaded = 1;
    }

    char *root = agent.root_dev;
    snprintf(root, sizeof agent.root_dev, "%s", DEFAULT_ROOT_DEVICE);
    int ro = 0;
    {
        char cmdline[4096];
        int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
        ssize_t n = fd >= 0 ? read(fd, cmdline, sizeof cmdline - 1) : -1;
        if (fd >= 0)
            close(fd);
        if (n < 0)
            n = 0;
        cmdline[n] = '\0';
        char *save = NULL;
        for (char *tok = strtok_r(cmdline, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save)) {
            const size_t root_len = strlen(BOOT_ARG_ROOT), ro_len = strlen(BOOT_ARG_READ_ONLY);
            if (strncmp(tok, BOOT_ARG_ROOT, root_len) == 0 && tok[root_len]) {
                const char *dev = tok + root_len;
                if (dev[0] == '/')
                    snprintf(root, sizeof agent.root_dev, "%s", dev);
                else
                    snprintf(root, sizeof agent.root_dev, "/dev/%s", dev);
            } else if (strncmp(tok, BOOT_ARG_READ_ONLY, ro_len) == 0 && strcmp(tok + ro_len, "1") == 0) {
                ro = 1;
            } else if (strncmp(tok, BOOT_ARG_READ_ONLY, ro_len) == 0 && strcmp(tok + ro_len, "0") == 0) {
                ro = 0;
            }
        }
    }
    agent.root_ro = ro;

    boot_network();
    start_warmer();
    if (agent.disks_loaded)
        free_initramfs();

    int64_t until = mono_ms() + DEVICE_WAIT_MS;
    while (chan_find_port(&chan) < 0) {
        if (mono_ms() >= until)
            fatal_boot("virtio-serial port %s not found within %d s", AGENT_PORT_NAME, DEVICE_WAIT_MS / 1000);
        sleep_ms(10);
    }
}

/* At the first CONFIG (after HELLO, so after a template snapshot): bind the disk driver, mount the root
 * disk and switch into it. */
static void mount_root(void)
{
    const char *root = agent.root_dev;
    int ro = agent.root_ro;
    if (agent.disks_loaded)
        bind_late_devices();
    else
        load_modules(1);
    struct stat st;
    int64_t until = mono_ms() + DEVICE_WAIT_MS;
    while (stat(root, &st) < 0 || !S_ISBLK(st.st_mode)) {
        if (mono_ms() >= until)
            fatal_boot("root device %s did not appear within %d s", root, DEVICE_WAIT_MS / 1000);
        sleep_ms(10);
    }

    if (mkdir("/newroot", 0755) < 0 && errno != EEXIST)
        fatal_boot("mkdir /newroot: %s", strerror(errno));
    if (mount(root, "/newroot", "ext4", ro ? MS_RDONLY : 0, NULL) < 0)
        fatal_boot("mounting %s (ext4%s) on /newroot failed: %s", root, ro ? ", ro" : "", strerror(errno));

    static const char *const moves[] = {"/dev", "/proc", "/sys"};
    for (size_t i = 0; i < sizeof moves / sizeof moves[0]; i++) {
        char target[64];
        snprintf(target, sizeof target, "/newroot%s", moves[i]);
        if (mkdir(target, 0755) < 0 && errno != EEXIST)
            logmsg("mkdir %s: %s", target, strerror(errno));
        if (mount(moves[i], target, NULL, MS_MOVE, NULL) < 0) {
            logmsg("moving %s to %s failed: %s; detaching it", moves[i], target, strerror(errno));
            umount2(moves[i], MNT_DETACH);
        }
    }

    free_initramfs();

    if (chdir("/newroot") < 0)
        fatal_boot("chdir /newroot: %s", strerror(errno));
    if (mount(".", "/", NULL, MS_MOVE, NULL) < 0)
        fatal_boot("moving /newroot to /: %s", strerror(errno));
    if (chroot(".") < 0)
        fatal_boot("chroot: %s", strerror(errno));
    if (chdir("/") < 0)
        fatal_boot("chdir /: %s", strerror(errno));

    /* the console fd points into the old /dev mount, which moved along: still valid */
    if (mkdir("/dev/pts", 0755) < 0 && errno != EEXIST)
        logmsg("mkdir /dev/pts: %s", strerror(errno));
    if (mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666") < 0 &&
        mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, NULL) < 0)
        logmsg("mounting devpts on /dev/pts failed: %s", strerror(errno));
    try_mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    try_mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
    try_mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");

    logmsg("root %s mounted%s", root, ro ? " read-only" : "");
}

/* ---- main loop ------------------------------------------------------------------------------------------- */

enum { K_CHAN, K_SIG, K_OUT, K_ERR, K_IN, K_MCHAN, K_MLISTEN, K_MCONN, K_PCONN };

static void handle_timers(void)
{
    int64_t now = mono_ms();
    for (struct session *s = execs.list, *next; s; s = next) {
        next = s->next;
        if (!s->exited) {
            if (s->deadline && !s->timed_out && now >= s->deadline) {
                s->timed_out = 1;
                signal_group(s, SIGTERM);
                s->kill_at = now + s->grace_ms;
            }
            if (s->timed_out && !s->killed && now >= s->kill_at) {
                s->killed = 1;
                signal_group(s, SIGKILL);
            }
        } else if ((s->out_fd < 0 && s->err_fd < 0) || now >= s->drain_until) {
            finish_session(s);
        }
    }
    if (console.respawn_at && now >= console.respawn_at && !console.pid)
        spawn_shell();
    chan_timers(&chan, now);
    med_timers(now);
}

static int next_timeout(void)
{
    int64_t now = mono_ms();
    int64_t next = -1;
#define CONSIDER(t)                                                                                    \
    do {                                                                                               \
        int64_t t_ = (t);                                                                              \
        if (next < 0 || t_ < next)                                                                     \
            next = t_;                                                                                 \
    } while (0)
    for (struct session *s = execs.list; s; s = s->next) {
        if (!s->exited) {
            if (s->deadline && !s->timed_out)
                CONSIDER(s->deadline);
            if (s->timed_out && !s->killed)
                CONSIDER(s->kill_at);
        } else {
            CONSIDER(s->drain_until);
        }
    }
    if (console.respawn_at)
        CONSIDER(console.respawn_at);
    int64_t chan_next = chan_next_deadline(&chan);
    if (chan_next >= 0)
        CONSIDER(chan_next);
    int64_t med_next = med_next_deadline();
    if (med_next >= 0)
        CONSIDER(med_next);
#undef CONSIDER
    if (next < 0)
        return -1;
    if (next <= now)
        return 0;
    return next - now > 60000 ? 60000 : (int)(next - now);
}

static void main_loop(void)
{
    struct pollfd *pfds = NULL;
    int *kinds = NULL;
    void **owners = NULL;
    size_t cap = 0;

    for (;;) {
        handle_timers();
        med_sweep();
        pub_sweep();

        size_t nsess = 0, nmconn = 0;
        int med_paused = 0;
        for (struct session *s = execs.list; s; s = s->next)
            nsess++;
        for (struct mconn *c = med.conns; c; c = c->next) {
            nmconn++;
            if (queue_pending(&c->out) >= MED_BUF_CAP)
                med_paused = 1;
        }
        size_t need = 4 + nsess * 3 + nmconn + ports.n;
        if (need > cap) {
            cap = need * 2;
            pfds = xrealloc(pfds, cap * sizeof *pfds);
            kinds = xrealloc(kinds, cap * sizeof *kinds);
            owners = xrealloc(owners, cap * sizeof *owners);
        }
        size_t n = 0;
#define ADD(fd_, ev_, kind_, owner_)                                                                     \
    do {                                                                                               \
        pfds[n].fd = (fd_);                                                                            \
        pfds[n].events = (ev_);                                                                        \
        pfds[n].revents = 0;                                                                           \
        kinds[n] = (kind_);                                                                            \
        owners[n] = (owner_);                                                                          \
        n++;                                                                                           \
    } while (0)
        ADD(agent.sig_fd, POLLIN, K_SIG, NULL);
        if (chan.fd >= 0 && execs.stdin_queued < STDIN_BACKPRESSURE)
            ADD(chan.fd, POLLIN, K_CHAN, NULL);
        for (struct session *s = execs.list; s; s = s->next) {
            if (s->out_fd >= 0)
                ADD(s->out_fd, POLLIN, K_OUT, s);
            if (s->err_fd >= 0)
                ADD(s->err_fd, POLLIN, K_ERR, s);
            if (s->in_fd >= 0 && queue_pending(&s->in))
                ADD(s->in_fd, POLLOUT, K_IN, s);
        }
        if (med_chan.fd >= 0 && !med_paused)
            ADD(med_chan.fd, POLLIN, K_MCHAN, NULL);
        if (med.listen_fd >= 0)
            ADD(med.listen_fd, POLLIN, K_MLISTEN, NULL);
        for (struct mconn *c = med.conns; c; c = c->next) {
            short ev = (short)((c->closing || c->rd_eof ? 0 : POLLIN) | (queue_pending(&c->out) ? POLLOUT : 0));
            if (ev)
                ADD(c->fd, ev, K_MCONN, c);
        }
        for (struct pconn *c = ports.list; c; c = c->next) {
            short ev = pub_events(c);
            if (ev)
                ADD(c->fd, ev, K_PCONN, c);
        }
#undef ADD

        int r = poll(pfds, n, next_timeout());
        if (r < 0) {
            if (errno != EINTR) {
                logmsg("poll: %s", strerror(errno));
                sleep_ms(10);
            }
            continue;
        }
        if (r == 0)
            continue;

        /* command pipes first, then children, then the channel (which may add or change sessions) */
        int chan_ready = 0, sig_ready = 0, mchan_ready = 0, mlisten_ready = 0;
        for (size_t i = 0; i < n; i++) {
            if (!pfds[i].revents)
                continue;
            struct session *s = owners[i];
            struct mconn *c = owners[i];
            switch (kinds[i]) {
            case K_CHAN:
                chan_ready = 1;
                break;
            case K_SIG:
                sig_ready = 1;
                break;
            case K_MCHAN:
                mchan_ready = 1;
                break;
            case K_MLISTEN:
                mlisten_ready = 1;
                break;
            case K_MCONN:
                /* dead connections stay allocated until the next med_sweep */
                if (!c->dead && c->fd == pfds[i].fd) {
                    short re = pfds[i].revents;
                    /* read first: what the program sent is forwarded even if writing to it fails next */
                    if (!c->closing && !c->rd_eof && (re & (POLLIN | POLLHUP | POLLERR)))
                        mconn_read(c);
                    if (c->dead)
                        break;
                    if (re & POLLOUT)
                        mconn_flush(c);
                    else if (c->closing && (re & (POLLHUP | POLLERR | POLLNVAL)))
                        mconn_close(c, 0, NULL);
                }
                break;
            case K_PCONN:
                if (!((struct pconn *)owners[i])->dead && ((struct pconn *)owners[i])->fd == pfds[i].fd)
                    pub_ready(owners[i], pfds[i].revents);
                break;
            case K_OUT:
                if (s->out_fd == pfds[i].fd)
                    pump_output(s, 0);
                break;
            case K_ERR:
                if (s->err_fd == pfds[i].fd)
                    pump_output(s, 1);
                break;
            case K_IN:
                if (s->in_fd == pfds[i].fd) {
                    if (pfds[i].revents & POLLOUT)
                        flush_stdin(s);
                    else
                        close_stdin(s); /* POLLERR: the reader is gone */
                }
                break;
            }
        }
        if (sig_ready) {
            drain_sigfd();
            reap_children();
        }
        /* the mediation channel before the listener: a MCUT/MRESUME sent before a program connected counts */
        if (mchan_ready && med_chan.fd >= 0)
            chan_read(&med_chan);
        if (mlisten_ready)
            med_accept();
        if (chan_ready && chan.fd >= 0)
            chan_read(&chan);
    }
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], AGENT_EXIT_ARG) == 0)
        return 0; /* the warmer's child (start_warmer) */
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--connect") == 0 && i + 1 < argc)
            agent.connect_path = argv[++i];
        else if (strncmp(argv[i], "--connect=", 10) == 0)
            agent.connect_path = argv[i] + 10;
        else if (strcmp(argv[i], "--mediation-connect") == 0 && i + 1 < argc)
            agent.med_connect_path = argv[++i];
        else if (strncmp(argv[i], "--mediation-connect=", 20) == 0)
            agent.med_connect_path = argv[i] + 20;
    }
    agent.is_pid1 = getpid() == 1;
    agent.test_mode = agent.connect_path != NULL;
    if (!agent.is_pid1 && !agent.test_mode) {
        fprintf(stderr, "usage: %s --connect SOCKET [--mediation-connect SOCKET]  (or run as PID 1 in the VM)\n",
                argv[0]);
        return 2;
    }

    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    agent.sig_fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (agent.sig_fd < 0) {
        logmsg("signalfd: %s", strerror(errno));
        if (agent.is_pid1 && !agent.test_mode)
            fatal_boot("signalfd failed");
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    if (agent.is_pid1) {
        signal(SIGTERM, SIG_IGN);
        signal(SIGINT, SIG_IGN);
        signal(SIGHUP, SIG_IGN);
    }

    if (agent.test_mode) {
        ensure_std_fds("/dev/null");
        prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        char err[400];
        if (chan_connect_unix(&chan, agent.connect_path, err, sizeof err) < 0) {
            logmsg("%s", err);
            return 1;
        }
    } else {
        boot();
        chan_open_port(&chan);
    }
    main_loop();
    return 0;
}
