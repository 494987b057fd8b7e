/* Helper for the Linux boot test, run inside the guest by its init script.
 *   guest_tool vsock-echo PORT MESSAGE  connect to host (CID 2) PORT, send
 *                                       MESSAGE + "\n", print the reply line
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/vm_sockets.h>

static int vsock_echo(unsigned port, const char *msg) {
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0) { perror("vsock socket"); return 1; }
    struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = port };
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) { perror("vsock connect"); return 1; }
    char line[256];
    int n = snprintf(line, sizeof line, "%s\n", msg);
    if (write(fd, line, n) != n) { perror("vsock write"); return 1; }
    char reply[256];
    int got = 0;
    while (got < (int)sizeof reply - 1) {
        int r = read(fd, reply + got, sizeof reply - 1 - got);
        if (r <= 0) break;
        got += r;
        if (memchr(reply, '\n', got)) break;
    }
    reply[got] = 0;
    printf("vsock reply: %s", reply);
    close(fd);
    return got > 0 ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "vsock-echo") == 0)
        return vsock_echo(atoi(argv[2]), argv[3]);
    fprintf(stderr, "usage: guest_tool vsock-echo PORT MSG\n");
    return 2;
}
