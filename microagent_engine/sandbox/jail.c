/* microagent jail: confine the hypervisor like Firecracker's jailer, then exec it.
 *
 * Runs as the supervisor's child. Joins the namespaces it is given (--join), unshares the rest (--unshare),
 * forks (a new pid namespace applies to children), and in the child: unshares mount/ipc/uts/net, builds a tmpfs root holding only the
 * bind mounts it is told (--bind-ro/--bind-rw/--symlink), pivots into it, sets rlimits, drops to an
 * unprivileged uid/gid with no capabilities and no_new_privs, and execs the hypervisor. The parent stays as the
 * hypervisor's waiter: it reports the hypervisor's host pid on --report-fd ("pid N\n", or "error MSG\n"),
 * forwards TERM/INT/HUP/QUIT and mirrors the hypervisor's exit (code or signal). --env NAME=VALUE adds to the
 * hypervisor's otherwise fixed environment.
 *
 * Build: gcc -static -O2 -Wall (the engine compiles and caches it by source hash).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/capability.h>

#define MAX_ITEMS 64

struct pair { const char *a, *b; };
struct rlim { int resource; rlim_t value; };

static struct pair binds_ro[MAX_ITEMS], binds_rw[MAX_ITEMS], links[MAX_ITEMS], joins[MAX_ITEMS];
static int n_ro, n_rw, n_links, n_joins;
static struct rlim rlims[16];
static int n_rlims;
static const char *root_dir, *hostname, *cgroup_dir;
static int unshare_flags, report_fd = -1, err_fd = -1;
static long uid = -1, gid = -1;
static gid_t groups[16];
static int n_groups;
static pid_t child;
static char *envp[MAX_ITEMS + 3] = {"PATH=/usr/bin:/bin", "LC_ALL=C"};
static int n_env = 2;

/* In the child: report a failed step to the waiter (which relays it to the supervisor) and exit. */
static void die(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    int saved = errno;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if (n >= (int)sizeof buf) n = sizeof buf - 1;
    n += snprintf(buf + n, sizeof buf - n, ": %s", strerror(saved));
    if (n >= (int)sizeof buf) n = sizeof buf - 1;
    if (err_fd >= 0) {
        if (write(err_fd, buf, n) < 0) {}
    } else {
        fprintf(stderr, "microagent-jail: %.*s\n", n, buf);
    }
    _exit(127);
}

static void report(const char *fmt, ...) {
    char buf[600];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (report_fd >= 0 && n > 0) {
        if (write(report_fd, buf, n < (int)sizeof buf ? n : (int)sizeof buf - 1) < 0) {}
    }
}

static int ns_flag(const char *name) {
    static const struct { const char *n; int f; } t[] = {
        {"user", CLONE_NEWUSER}, {"mnt", CLONE_NEWNS}, {"pid", CLONE_NEWPID}, {"ipc", CLONE_NEWIPC},
        {"uts", CLONE_NEWUTS}, {"net", CLONE_NEWNET}, {"cgroup", CLONE_NEWCGROUP}};
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++)
        if (!strcmp(t[i].n, name)) return t[i].f;
    return 0;
}

static int rlimit_id(const char *name) {
    if (!strcmp(name, "nofile")) return RLIMIT_NOFILE;
    if (!strcmp(name, "nproc")) return RLIMIT_NPROC;
    if (!strcmp(name, "core")) return RLIMIT_CORE;
    if (!strcmp(name, "fsize")) return RLIMIT_FSIZE;
    if (!strcmp(name, "memlock")) return RLIMIT_MEMLOCK;
    if (!strcmp(name, "as")) return RLIMIT_AS;
    return -1;
}

static void usage(const char *why) {
    fprintf(stderr, "microagent-jail: %s\n", why);
    exit(126);
}

/* mkdir -p for a path inside the jail (absolute, under root_dir). */
static void make_parents(const char *path) {
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(buf, 0755) < 0 && errno != EEXIST) die("mkdir %s", buf);
        *p = '/';
    }
}

static void bind(const char *src, const char *dst, int read_only) {
    char target[4096];
    struct stat st;
    snprintf(target, sizeof target, "%s%s", root_dir, dst);
    if (stat(src, &st) < 0) die("stat %s", src);
    make_parents(target);
    if (S_ISDIR(st.st_mode)) {
        if (mkdir(target, 0755) < 0 && errno != EEXIST) die("mkdir %s", target);
    } else {
        int fd = open(target, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
        if (fd < 0) die("create %s", target);
        close(fd);
    }
    /* non-recursive: submounts under src stay hidden; a user namespace refuses that when they are locked */
    if (mount(src, target, NULL, MS_BIND, NULL) < 0 &&
        (errno != EINVAL || mount(src, target, NULL, MS_BIND | MS_REC, NULL) < 0))
        die("bind %s", src);
    struct statvfs sv;
    if (statvfs(target, &sv) < 0) die("statvfs %s", target);
    unsigned long keep = 0; /* a remount must keep the flags a user namespace has locked */
    if (sv.f_flag & ST_NOSUID) keep |= MS_NOSUID;
    if (sv.f_flag & ST_NODEV) keep |= MS_NODEV;
    if (sv.f_flag & ST_NOEXEC) keep |= MS_NOEXEC;
    if (sv.f_flag & ST_NOATIME) keep |= MS_NOATIME;
    if (sv.f_flag & ST_NODIRATIME) keep |= MS_NODIRATIME;
    if (sv.f_flag & ST_RELATIME) keep |= MS_RELATIME;
    if (read_only || (sv.f_flag & ST_RDONLY)) keep |= MS_RDONLY;
    keep |= MS_NOSUID; /* nothing in the jail may gain privileges by exec */
    if (mount(NULL, target, NULL, MS_REMOUNT | MS_BIND | keep, NULL) < 0) die("remount %s", target);
}

static void build_root(void) {
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) die("make / private");
    if (mount("jail", root_dir, "tmpfs", MS_NOSUID | MS_NODEV, "size=256k,nr_inodes=512,mode=0755") < 0)
        die("mount tmpfs on %s", root_dir);
    for (int i = 0; i < n_ro; i++) bind(binds_ro[i].a, binds_ro[i].b, 1);
    for (int i = 0; i < n_rw; i++) bind(binds_rw[i].a, binds_rw[i].b, 0);
    for (int i = 0; i < n_links; i++) {
        char target[4096];
        snprintf(target, sizeof target, "%s%s", root_dir, links[i].b);
        make_parents(target);
        if (symlink(links[i].a, target) < 0) die("symlink %s", target);
    }
    char old[4096];
    snprintf(old, sizeof old, "%s/.old", root_dir);
    if (mkdir(old, 0700) < 0) die("mkdir %s", old);
    if (syscall(SYS_pivot_root, root_dir, old) < 0) die("pivot_root %s", root_dir);
    if (chdir("/") < 0) die("chdir /");
    if (umount2("/.old", MNT_DETACH) < 0) die("detach the old root");
    if (rmdir("/.old") < 0) die("rmdir /.old");
    if (mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) < 0)
        die("remount / read-only");
}

static void drop_privileges(void) {
    /* the bounding set first (needs CAP_SETPCAP), then ids, then whatever capabilities remain */
    for (int cap = 0; cap <= 63; cap++)
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL) die("drop capability %d", cap);
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    if (gid >= 0) {
        if (setgroups(n_groups, groups) < 0) die("setgroups");
        if (setresgid(gid, gid, gid) < 0) die("setresgid %ld", gid);
    }
    if (uid >= 0 && setresuid(uid, uid, uid) < 0) die("setresuid %ld", uid);
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    if (syscall(SYS_capset, &hdr, data) < 0) die("clear capabilities");
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) die("no_new_privs");
    /* cleared by the credential change above: set it again so the hypervisor dies with its waiter */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0) die("pdeathsig");
}

static void forward(int sig) {
    if (child > 0) kill(child, sig);
}

int main(int argc, char **argv) {
    int i = 1;
    for (; i < argc; i++) {
        const char *a = argv[i];
        int more = argc - i - 1;
        if (!strcmp(a, "--")) { i++; break; }
        if (!strcmp(a, "--report-fd") && more >= 1) report_fd = atoi(argv[++i]);
        else if (!strcmp(a, "--root") && more >= 1) root_dir = argv[++i];
        else if (!strcmp(a, "--hostname") && more >= 1) hostname = argv[++i];
        else if (!strcmp(a, "--cgroup") && more >= 1) cgroup_dir = argv[++i];
        else if (!strcmp(a, "--uid") && more >= 1) uid = atol(argv[++i]);
        else if (!strcmp(a, "--gid") && more >= 1) gid = atol(argv[++i]);
        else if (!strcmp(a, "--group") && more >= 1 && n_groups < 16) groups[n_groups++] = atol(argv[++i]);
        else if (!strcmp(a, "--unshare") && more >= 1) {
            int f = ns_flag(argv[++i]);
            if (!f) usage("unknown namespace for --unshare");
            unshare_flags |= f;
        } else if (!strcmp(a, "--join") && more >= 2 && n_joins < MAX_ITEMS) {
            joins[n_joins].a = argv[i + 1]; joins[n_joins++].b = argv[i + 2]; i += 2;
        } else if (!strcmp(a, "--bind-ro") && more >= 2 && n_ro < MAX_ITEMS) {
            binds_ro[n_ro].a = argv[i + 1]; binds_ro[n_ro++].b = argv[i + 2]; i += 2;
        } else if (!strcmp(a, "--bind-rw") && more >= 2 && n_rw < MAX_ITEMS) {
            binds_rw[n_rw].a = argv[i + 1]; binds_rw[n_rw++].b = argv[i + 2]; i += 2;
        } else if (!strcmp(a, "--symlink") && more >= 2 && n_links < MAX_ITEMS) {
            links[n_links].a = argv[i + 1]; links[n_links++].b = argv[i + 2]; i += 2;
        } else if (!strcmp(a, "--env") && more >= 1 && n_env < MAX_ITEMS + 2) {
            envp[n_env++] = argv[++i]; /* NAME=VALUE for the hypervisor (the ro-open shim of a clone) */
        } else if (!strcmp(a, "--rlimit") && more >= 2 && n_rlims < 16) {
            int r = rlimit_id(argv[i + 1]);
            if (r < 0) usage("unknown resource for --rlimit");
            rlims[n_rlims].resource = r;
            rlims[n_rlims++].value = strtoull(argv[i + 2], NULL, 10);
            i += 2;
        } else usage("bad arguments; see jail.c");
    }
    if (i >= argc) usage("no command after --");
    if (report_fd >= 0) fcntl(report_fd, F_SETFD, FD_CLOEXEC);
    pid_t parent = getppid();
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0); /* the waiter dies with the supervisor, and QEMU with it */
    if (getppid() != parent) return 126;
    struct rlimit nocore = {0, 0};
    setrlimit(RLIMIT_CORE, &nocore); /* also the waiter: it re-raises the hypervisor's fatal signal */

    if (cgroup_dir) {
        char path[4096];
        snprintf(path, sizeof path, "%s/cgroup.procs", cgroup_dir);
        int fd = open(path, O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, "0\n", 2) != 2) { report("error join cgroup %s: %s\n", cgroup_dir, strerror(errno)); return 126; }
        close(fd);
    }
    /* a user namespace first: it owns the namespaces joined or created after it */
    for (int pass = 0; pass < 2; pass++) {
        for (int j = 0; j < n_joins; j++) {
            int is_user = !strcmp(joins[j].a, "user");
            if (is_user != (pass == 0)) continue;
            int fd = open(joins[j].b, O_RDONLY | O_CLOEXEC);
            if (fd < 0 || setns(fd, ns_flag(joins[j].a)) < 0) {
                report("error join %s namespace %s: %s\n", joins[j].a, joins[j].b, strerror(errno));
                return 126;
            }
            close(fd);
        }
    }
    uid_t outer_uid = geteuid();
    gid_t outer_gid = getegid();
    /* user and pid here (pid applies to the child); the rest in the child, so this waiter keeps the host's */
    int early = unshare_flags & (CLONE_NEWUSER | CLONE_NEWPID);
    if (early && unshare(early) < 0) {
        report("error unshare namespaces (0x%x): %s\n", early, strerror(errno));
        return 126;
    }
    if (unshare_flags & CLONE_NEWUSER) { /* map ourselves to ourselves: the only mapping the kernel allows */
        char map[64];
        int fd;
        if ((fd = open("/proc/self/setgroups", O_WRONLY | O_CLOEXEC)) >= 0) {
            if (write(fd, "deny", 4) < 0) {}
            close(fd);
        }
        snprintf(map, sizeof map, "%u %u 1\n", outer_uid, outer_uid);
        fd = open("/proc/self/uid_map", O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, map, strlen(map)) < 0) { report("error write uid_map: %s\n", strerror(errno)); return 126; }
        close(fd);
        snprintf(map, sizeof map, "%u %u 1\n", outer_gid, outer_gid);
        fd = open("/proc/self/gid_map", O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, map, strlen(map)) < 0) { report("error write gid_map: %s\n", strerror(errno)); return 126; }
        close(fd);
    }
    int errpipe[2];
    if (pipe2(errpipe, O_CLOEXEC) < 0) { report("error pipe: %s\n", strerror(errno)); return 126; }
    child = fork();
    if (child < 0) { report("error fork: %s\n", strerror(errno)); return 126; }
    if (child == 0) {
        close(errpipe[0]);
        err_fd = errpipe[1];
        if (report_fd >= 0) close(report_fd);
        if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0) die("pdeathsig");
        int late = unshare_flags & ~(CLONE_NEWUSER | CLONE_NEWPID);
        if (late && unshare(late) < 0) die("unshare namespaces (0x%x)", late);
        if (root_dir) build_root();
        if (hostname && (unshare_flags & CLONE_NEWUTS) && sethostname(hostname, strlen(hostname)) < 0)
            die("sethostname");
        for (int r = 0; r < n_rlims; r++) {
            struct rlimit rl = {rlims[r].value, rlims[r].value};
            if (setrlimit(rlims[r].resource, &rl) < 0) die("setrlimit %d", rlims[r].resource);
        }
        drop_privileges();
        execve(argv[i], argv + i, envp);
        die("exec %s", argv[i]);
    }
    close(errpipe[1]);
    char msg[512];
    ssize_t n, got = 0;
    while ((n = read(errpipe[0], msg + got, sizeof msg - 1 - got)) != 0) {
        if (n < 0) { if (errno == EINTR) continue; break; }
        got += n;
        if (got >= (ssize_t)sizeof msg - 1) break;
    }
    close(errpipe[0]);
    if (got > 0) {
        msg[got] = 0;
        report("error %s\n", msg);
    } else {
        report("pid %d\n", (int)child);
    }
    if (report_fd >= 0) close(report_fd);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = forward;
    for (int s = 0; s < 4; s++) sigaction((int[]){SIGTERM, SIGINT, SIGHUP, SIGQUIT}[s], &sa, NULL);
    int status;
    while (waitpid(child, &status, 0) < 0)
        if (errno != EINTR) return 126;
    if (WIFSIGNALED(status)) { /* die the same way, so the supervisor sees the hypervisor's signal */
        int sig = WTERMSIG(status);
        signal(sig, SIG_DFL);
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, sig);
        sigprocmask(SIG_UNBLOCK, &set, NULL);
        kill(getpid(), sig);
        return 128 + sig;
    }
    return WEXITSTATUS(status);
}
