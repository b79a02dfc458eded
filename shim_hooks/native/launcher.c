/*
 * containerd-shim-kata-ipu-v2, native launcher.
 *
 * containerd executes the shim binary's `start` on the critical path of every container; a
 * Python interpreter needs 10-15 ms just to start on a small host, about a fifth of a whole
 * `ctr run` (docs/adr/0004-resident-shim-server.md). This program does only what
 * shim_hooks/launcher.py does before it imports anything:
 *
 *   `start` or `delete`, and kata-ipu-shimd listens on $KATA_IPU_SHIM_SERVER (default
 *   /run/kata-ipu/shimd.sock; empty = off):  send argv, environment, cwd and the stdio
 *   descriptors there (the format is shim_hooks/handoff.py's), exit with the status the
 *   server's child reports. The child writes the address (or delete's reply) on our stdout
 *   itself.
 *
 *   anything else (no server, `-v`, a hand-off that could not be sent):  exec the Python shim
 *   (KATA_IPU_PYTHON_SHIM, fixed at build time by scripts/build-launcher), which does the same
 *   work in-process.
 *
 * Once the message is sent the server owns the start: this program never falls back after
 * that point (the delegate shim may already be running).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef KATA_IPU_PYTHON_SHIM
#error "build with -DKATA_IPU_PYTHON_SHIM=\"/path/to/python/containerd-shim-kata-ipu-v2\""
#endif

#define MAGIC "kata-ipu-shim-start/1"
#define DEFAULT_SERVER "/run/kata-ipu/shimd.sock"
#define MAX_MESSAGE (1 << 20)

extern char **environ;

static char *buf;
static size_t len;

/* Append one NUL-terminated field; 0 when the message would exceed MAX_MESSAGE. */
static int add(const char *field, int terminate) {
    size_t n = strlen(field);
    if (len + n + 1 > MAX_MESSAGE)
        return 0;
    memcpy(buf + len, field, n);
    len += n;
    if (terminate)
        buf[len++] = '\0';
    return 1;
}

static int add_count(long n) {
    char num[24];
    snprintf(num, sizeof num, "%ld", n);
    return add(num, 1);
}

static void python_shim(char **argv) {
    argv[0] = (char *)KATA_IPU_PYTHON_SHIM;
    execv(KATA_IPU_PYTHON_SHIM, argv);
    fprintf(stderr, "containerd-shim-kata-ipu-v2: cannot run %s: %s\n", KATA_IPU_PYTHON_SHIM,
            strerror(errno));
    exit(1);
}

int main(int argc, char **argv) {
    const char *path = getenv("KATA_IPU_SHIM_SERVER");
    if (path == NULL)
        path = DEFAULT_SERVER;
    if (argc < 2 || *path == '\0' ||
        (strcmp(argv[argc - 1], "start") != 0 && strcmp(argv[argc - 1], "delete") != 0))
        python_shim(argv);

    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path)
        python_shim(argv);
    strcpy(addr.sun_path, path);
    int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0)
        python_shim(argv); /* no server: nothing was sent */

    char cwd[4096];
    long nenv = 0;
    for (char **e = environ; *e; e++)
        nenv++;
    buf = malloc(MAX_MESSAGE);
    int ok = buf != NULL && getcwd(cwd, sizeof cwd) != NULL && add(MAGIC, 1) &&
             add_count(argc);
    for (int i = 0; ok && i < argc; i++)
        ok = add(argv[i], 1);
    ok = ok && add_count(nenv);
    for (char **e = environ; ok && *e; e++)
        ok = add(*e, 1);
    ok = ok && add(cwd, 0);
    if (!ok) {
        close(sock);
        python_shim(argv);
    }

    int fds[3] = {0, 1, 2};
    union {
        char space[CMSG_SPACE(sizeof fds)];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space,
                         .msg_controllen = sizeof control.space};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(cmsg), fds, sizeof fds);
    if (sendmsg(sock, &msg, MSG_NOSIGNAL) < 0) {
        close(sock);
        python_shim(argv); /* not received: the server did nothing */
    }

    char reply[16];
    ssize_t n;
    do
        n = recv(sock, reply, sizeof reply - 1, 0);
    while (n < 0 && errno == EINTR);
    if (n <= 0) {
        fprintf(stderr, "containerd-shim-kata-ipu-v2: kata-ipu-shimd at %s did not finish the "
                        "start (see its log)\n", path);
        return 1;
    }
    reply[n] = '\0';
    for (ssize_t i = 0; i < n; i++)
        if (reply[i] < '0' || reply[i] > '9')
            return 1;
    return atoi(reply);
}
