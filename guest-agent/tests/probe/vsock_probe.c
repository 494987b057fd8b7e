/*
 * vsock-probe: tries to reach the agent's ports over vsock from inside a
 * container, as a hostile workload would. busybox has no vsock client.
 *
 *   vsock-probe PORT...
 *
 * For each CID (1 local, 2 host, 3 the guest, VMADDR_CID_ANY) and port it
 * prints one line, "cid C port P: connected" or "cid C port P: STEP: ERR"
 * with the step that failed (socket or connect) and errno's name, and
 * exits with the number of connections that succeeded.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static const char *errname(int e)
{
    switch (e) {
    case EACCES: return "EACCES";
    case EPERM: return "EPERM";
    case EAFNOSUPPORT: return "EAFNOSUPPORT";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ECONNRESET: return "ECONNRESET";
    case ENODEV: return "ENODEV";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EHOSTUNREACH: return "EHOSTUNREACH";
    case ENETUNREACH: return "ENETUNREACH";
    case EADDRNOTAVAIL: return "EADDRNOTAVAIL";
    default: return strerror(e);
    }
}

/* 0 when connected, else the errno of the failed step in *step. */
static int try_connect(unsigned cid, unsigned port, const char **step)
{
    struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port };
    struct pollfd p;
    socklen_t len = sizeof(int);
    int fd, err = 0;

    *step = "socket";
    fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return errno;
    *step = "connect";
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0)
        goto out;
    if (errno != EINPROGRESS) {
        err = errno;
        goto out;
    }
    p.fd = fd;
    p.events = POLLOUT;
    if (poll(&p, 1, 5000) != 1) {
        err = ETIMEDOUT;
        goto out;
    }
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
        err = errno;
    if (err == 0) {
        /* A peer that accepts and then closes at once did refuse us. */
        char c;
        p.events = POLLIN;
        if (poll(&p, 1, 2000) == 1 && read(fd, &c, 1) == 0)
            err = ECONNRESET;
    }
out:
    close(fd);
    return err;
}

int main(int argc, char **argv)
{
    static const unsigned cids[] = { 1, VMADDR_CID_HOST, 3, VMADDR_CID_ANY };
    int connected = 0;

    for (int i = 1; i < argc; i++) {
        unsigned port = (unsigned)strtoul(argv[i], NULL, 10);
        for (size_t c = 0; c < sizeof(cids) / sizeof(cids[0]); c++) {
            const char *step;
            int err = try_connect(cids[c], port, &step);
            if (err == 0) {
                printf("cid %u port %u: connected\n", cids[c], port);
                connected++;
            } else {
                printf("cid %u port %u: %s: %s\n", cids[c], port, step, errname(err));
            }
        }
    }
    return connected;
}
