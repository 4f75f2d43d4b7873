/* microagent ro-open: an LD_PRELOAD shim for a clone's QEMU.
 *
 * QEMU 7.2 opens a memory-backend-file O_RDWR even with share=off (a private, copy-on-write mapping, which a
 * read-only descriptor allows). A clone maps its template's RAM file that way, and must not be able to write
 * into it (or punch holes in it: QEMU 7.2 discards guest RAM with fallocate even on private mappings), since
 * other clones map the same file. This shim turns an O_RDWR open of the path in $MICROAGENT_RO_OPEN into an
 * O_RDONLY one; the file is bound read-only into the jail anyway, so without the shim QEMU fails to start.
 *
 * Build: gcc -shared -fPIC -O2 -Wall (microagent_engine/snapshots/shim.py).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

typedef int (*open_fn)(const char *, int, ...);
typedef int (*open2_fn)(const char *, int);

static int adjust(const char *path, int flags)
{
    const char *ro = getenv("MICROAGENT_RO_OPEN");
    if (ro && path && strcmp(path, ro) == 0 && (flags & O_ACCMODE) == O_RDWR && !(flags & O_CREAT))
        return (flags & ~O_ACCMODE) | O_RDONLY;
    return flags;
}

static mode_t mode_arg(int flags, va_list ap)
{
    return (flags & O_CREAT) || (flags & __O_TMPFILE) == __O_TMPFILE ? va_arg(ap, mode_t) : 0;
}

#define WRAP(name)                                                                                     \
    int name(const char *path, int flags, ...)                                                         \
    {                                                                                                  \
        static open_fn real;                                                                           \
        va_list ap;                                                                                    \
        va_start(ap, flags);                                                                           \
        mode_t mode = mode_arg(flags, ap);                                                             \
        va_end(ap);                                                                                    \
        if (!real)                                                                                     \
            real = (open_fn)dlsym(RTLD_NEXT, #name);                                                   \
        return real(path, adjust(path, flags), mode);                                                  \
    }
WRAP(open)
WRAP(open64)

#define WRAP2(name)                                                                                    \
    int name(const char *path, int flags)                                                              \
    {                                                                                                  \
        static open2_fn real;                                                                          \
        if (!real)                                                                                     \
            real = (open2_fn)dlsym(RTLD_NEXT, #name);                                                  \
        return real(path, adjust(path, flags));                                                        \
    }
WRAP2(__open_2)
WRAP2(__open64_2)
