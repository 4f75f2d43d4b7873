/* A DNS probe run inside the guest by tests/test_vm_network.py (copied in, static, like tests/hostile).
 *
 *   dnsprobe udp ADDR PORT HEX...   one UDP socket connected to ADDR:PORT sends each HEX payload in order, then
 *                                   prints the first reply as hex ("timeout" after 10 s, "error: ..." on errors)
 *   dnsprobe tcp ADDR PORT HEX      connects, sends HEX with its 2-byte length, prints the reply's payload as hex
 *                                   ("closed" when the server closes without one, "error: ..." otherwise)
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static size_t unhex(const char *s, unsigned char *out, size_t cap)
{
    size_t n = 0;
    while (s[0] && s[1] && n < cap) {
        unsigned v;
        if (sscanf(s, "%2x", &v) != 1)
            break;
        out[n++] = (unsigned char)v;
        s += 2;
    }
    return n;
}

static void printhex(const unsigned char *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        printf("%02x", b[i]);
    printf("\n");
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: dnsprobe udp|tcp ADDR PORT HEX...\n");
        return 2;
    }
    int udp = strcmp(argv[1], "udp") == 0;
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((unsigned short)atoi(argv[3]));
    if (inet_pton(AF_INET, argv[2], &sa.sin_addr) != 1) {
        printf("error: bad address\n");
        return 1;
    }
    int s = socket(AF_INET, udp ? SOCK_DGRAM : SOCK_STREAM, 0);
    struct timeval tv = {10, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) {
        printf("error: connect: %s\n", strerror(errno));
        return 1;
    }
    static unsigned char buf[70000];
    if (udp) {
        for (int i = 4; i < argc; i++) {
            size_t n = unhex(argv[i], buf, sizeof buf);
            if (send(s, buf, n, 0) < 0) {
                printf("error: send: %s\n", strerror(errno));
                return 1;
            }
        }
        ssize_t got = recv(s, buf, sizeof buf, 0);
        if (got < 0) {
            printf(errno == EAGAIN || errno == EWOULDBLOCK ? "timeout\n" : "error: recv: %s\n", strerror(errno));
            return 1;
        }
        printhex(buf, (size_t)got);
        return 0;
    }
    size_t n = unhex(argv[4], buf + 2, sizeof buf - 2);
    buf[0] = (unsigned char)(n >> 8);
    buf[1] = (unsigned char)n;
    if (send(s, buf, n + 2, 0) < 0) {
        printf("error: send: %s\n", strerror(errno));
        return 1;
    }
    size_t have = 0, want = 2;
    while (have < want) {
        ssize_t got = recv(s, buf + have, want - have, 0);
        if (got == 0) {
            printf("closed\n");
            return 1;
        }
        if (got < 0) {
            printf(errno == EAGAIN || errno == EWOULDBLOCK ? "timeout\n" : "error: recv: %s\n", strerror(errno));
            return 1;
        }
        have += (size_t)got;
        if (have == 2 && want == 2)
            want = 2 + ((size_t)buf[0] << 8 | buf[1]);
    }
    printhex(buf + 2, want - 2);
    return 0;
}
