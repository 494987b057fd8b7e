/* Helper for the Linux tests, run inside the guest by their init scripts.
 *   guest_tool vsock-echo PORT MESSAGE  connect to host (CID 2) PORT, send
 *                                       MESSAGE + "\n", print the reply line
 *   guest_tool vsock-serve PORT         listen on PORT; answer each line
 *                                       with "echo LINE rand=HEX", where
 *                                       HEX is 8 bytes of getrandom; a
 *                                       line "sleep" is answered after a
 *                                       200 ms nanosleep (a guest timer)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/random.h>
#include <time.h>
#include <linux/vm_sockets.h>

/* Reads from fd until a newline, EOF or a full buffer; NUL-terminates.
 * Returns the number of bytes read. */
static int read_line(int fd, char *buf, int size) {
    int got = 0;
    while (got < size - 1) {
        int r = read(fd, buf + got, size - 1 - got);
        if (r <= 0) break;
        got += r;
        if (memchr(buf, '\n', got)) break;
    }
    buf[got] = 0;
    return got;
}

static int vsock_echo(unsigned port, const char *msg) {
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0) { perror("vsock socket"); return 1; }
    struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = port };
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) { perror("vsock connect"); return 1; }
    char line[256];
    int n = snprintf(line, sizeof line, "%s\n", msg);
    if (write(fd, line, n) != n) { perror("vsock write"); return 1; }
    char reply[256];
    int got = read_line(fd, reply, sizeof reply);
    printf("vsock reply: %s", reply);
    close(fd);
    return got > 0 ? 0 : 1;
}

static int vsock_serve(unsigned port) {
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0) { perror("vsock socket"); return 1; }
    struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 4) < 0) {
        perror("vsock listen");
        return 1;
    }
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c < 0) continue;
        char line[128];
        read_line(c, line, sizeof line);
        char *nl = strchr(line, '\n');
        if (nl) *nl = 0;
        if (strcmp(line, "sleep") == 0) {
            struct timespec ts = { .tv_sec = 0, .tv_nsec = 200 * 1000 * 1000 };
            nanosleep(&ts, NULL);
        }
        unsigned char rnd[8];
        if (getrandom(rnd, sizeof rnd, 0) != sizeof rnd) memset(rnd, 0, sizeof rnd);
        char reply[256];
        int n = snprintf(reply, sizeof reply, "echo %s rand=", line);
        for (int i = 0; i < 8; i++) n += snprintf(reply + n, sizeof reply - n, "%02x", rnd[i]);
        n += snprintf(reply + n, sizeof reply - n, "\n");
        if (write(c, reply, n) != n) perror("vsock write");
        close(c);
    }
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "vsock-echo") == 0)
        return vsock_echo(atoi(argv[2]), argv[3]);
    if (argc == 3 && strcmp(argv[1], "vsock-serve") == 0)
        return vsock_serve(atoi(argv[2]));
    fprintf(stderr, "usage: guest_tool vsock-echo PORT MSG | vsock-serve PORT\n");
    return 2;
}
