/* virtio-vsock check: a guest-initiated stream to host port 1234 and a
 * host-initiated stream to guest port 5678, with data both ways and clean
 * shutdowns. Stream sockets only; packets as in the virtio spec 5.10. */
#include "guest.h"

#define HOST_CID 2
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define TYPE_STREAM 1
#define SHUT_BOTH 3
#define BUF_ALLOC 65536
/* Bytes each way in the bulk phase of port 5678: well past its receive
 * buffer, so flow control has to work in both directions. */
#define BULK 100000

struct __attribute__((packed)) vsock_hdr {
    u64 src_cid;
    u64 dst_cid;
    u32 src_port;
    u32 dst_port;
    u32 len;
    u16 type;
    u16 op;
    u32 flags;
    u32 buf_alloc;
    u32 fwd_cnt;
};
_Static_assert(sizeof(struct vsock_hdr) == 44, "virtio_vsock_hdr is 44 bytes");

enum state { CLOSED, LISTEN, CONNECTING, ESTABLISHED };

struct conn {
    const char *name;
    u32 lport, pport;
    enum state state;
    int got_rst;
    u32 peer_shutdown;
    u32 fwd_cnt; /* bytes received and consumed */
    u32 tx_cnt;  /* bytes sent */
    u32 peer_buf_alloc, peer_fwd_cnt;
    u32 buf_alloc; /* our receive buffer, as advertised */
    u32 adv_fwd;   /* the fwd_cnt we last told the peer */
    u32 bulk_left, bulk_got; /* streamed data, checked and dropped */
    u8 rx[4096];
    u32 rxlen;
};

#define RX_BUFS 8
#define RX_BUF_SIZE 2048
static u8 rx_bufs[RX_BUFS][RX_BUF_SIZE];
static u32 events[2];
static struct vsock_hdr tx_hdr;
static struct vdev dev;
static u64 guest_cid;
static struct conn c_out = {
    .name = "to host 1234", .lport = 49152, .pport = 1234, .buf_alloc = BUF_ALLOC};
/* A small buffer, so the host must wait for our credit updates. */
static struct conn c_in = {.name = "from host to 5678", .lport = 5678, .buf_alloc = 8192};
static struct conn c_none = {
    .name = "to host 4321", .lport = 49153, .pport = 4321, .buf_alloc = BUF_ALLOC};

static void send_raw(u32 sport, u32 dport, u16 op, u32 flags, u32 buf_alloc, u32 fwd,
                     const void *data, u32 len)
{
    tx_hdr = (struct vsock_hdr){
        .src_cid = guest_cid,
        .dst_cid = HOST_CID,
        .src_port = sport,
        .dst_port = dport,
        .len = len,
        .type = TYPE_STREAM,
        .op = op,
        .flags = flags,
        .buf_alloc = buf_alloc,
        .fwd_cnt = fwd,
    };
    /* Header and payload in separate descriptors, as Linux sends them. */
    struct vbuf b[2] = {{&tx_hdr, sizeof(tx_hdr), 0}, {(void *)data, len, 0}};
    struct vq *tx = &dev.q[1];
    vq_add(tx, 0, b, len ? 2 : 1);
    vq_kick(tx);
    u32 id, used;
    vq_wait(tx, &id, &used, 10, "a vsock tx completion");
}

static void send_pkt(struct conn *c, u16 op, u32 flags, const void *data, u32 len)
{
    send_raw(c->lport, c->pport, op, flags, c->buf_alloc, c->fwd_cnt, data, len);
    c->adv_fwd = c->fwd_cnt;
    if (op == OP_RW)
        c->tx_cnt += len;
}

static void post_rx(u16 i)
{
    struct vbuf b = {rx_bufs[i], RX_BUF_SIZE, 1};
    vq_add(&dev.q[0], i, &b, 1);
}

static void log_conn(struct conn *c, const char *what)
{
    say_begin();
    put_str("vsock ");
    put_str(c->name);
    put_str(": ");
    put_str(what);
    put_nl();
}

static u8 bulk_pattern(u32 k) { return (u8)(k * 7 + k / 251); }

static void receive(struct conn *c, const u8 *data, u32 len)
{
    if (c->state != ESTABLISHED)
        fail("vsock data on a connection that is not established");
    /* The peer may have at most buf_alloc bytes in flight beyond the
     * fwd_cnt we last advertised. */
    if (c->fwd_cnt + len - c->adv_fwd > c->buf_alloc)
        fail("vsock peer sent more than our credit allowed");
    if (c->bulk_left) {
        if (len > c->bulk_left)
            fail("vsock received more bulk data than expected");
        for (u32 i = 0; i < len; i++)
            if (data[i] != bulk_pattern(c->bulk_got + i))
                fail("vsock bulk data differs from the pattern");
        c->bulk_got += len;
        c->bulk_left -= len;
    } else {
        if (c->rxlen + len > sizeof(c->rx))
            fail("vsock received more data than expected");
        memcpy(c->rx + c->rxlen, data, len);
        c->rxlen += len;
    }
    c->fwd_cnt += len;
    /* Consumed at once; tell the peer before its window runs out. */
    if (c->fwd_cnt - c->adv_fwd >= c->buf_alloc / 2)
        send_pkt(c, OP_CREDIT_UPDATE, 0, NULL, 0);
}

static void handle(const struct vsock_hdr *h, const u8 *data)
{
    struct conn *c = NULL;
    struct conn *all[3] = {&c_out, &c_in, &c_none};
    for (int i = 0; i < 3; i++) {
        struct conn *k = all[i];
        if (h->dst_port != k->lport || k->state == CLOSED)
            continue;
        if (k->state == LISTEN || k->pport == h->src_port)
            c = k;
    }
    if (h->dst_cid != guest_cid || h->src_cid != HOST_CID || h->type != TYPE_STREAM || !c) {
        say_begin();
        put_str("vsock unexpected packet op=");
        put_dec(h->op);
        put_str(" ports ");
        put_dec(h->src_port);
        put_str("->");
        put_dec(h->dst_port);
        put_nl();
        if (h->op != OP_RST)
            send_raw(h->dst_port, h->src_port, OP_RST, 0, BUF_ALLOC, 0, NULL, 0);
        return;
    }
    c->peer_buf_alloc = h->buf_alloc;
    c->peer_fwd_cnt = h->fwd_cnt;
    switch (h->op) {
    case OP_REQUEST:
        if (c->state != LISTEN) {
            send_raw(h->dst_port, h->src_port, OP_RST, 0, BUF_ALLOC, 0, NULL, 0);
            return;
        }
        c->pport = h->src_port;
        c->state = ESTABLISHED;
        send_pkt(c, OP_RESPONSE, 0, NULL, 0);
        log_conn(c, "accepted");
        break;
    case OP_RESPONSE:
        if (c->state != CONNECTING)
            fail("vsock RESPONSE on a connection that is not connecting");
        c->state = ESTABLISHED;
        log_conn(c, "connected");
        break;
    case OP_RW:
        receive(c, data, h->len);
        break;
    case OP_CREDIT_UPDATE:
        break;
    case OP_CREDIT_REQUEST:
        send_pkt(c, OP_CREDIT_UPDATE, 0, NULL, 0);
        break;
    case OP_SHUTDOWN:
        c->peer_shutdown |= h->flags;
        log_conn(c, "peer shut down");
        break;
    case OP_RST:
        c->got_rst = 1;
        c->state = CLOSED;
        log_conn(c, "reset by peer");
        break;
    default:
        fail("vsock unknown op");
    }
}

/* Handles every packet the device has delivered; 1 if there was any. */
static int poll_rx(void)
{
    u32 id, len;
    int any = 0;
    while (vq_used(&dev.q[0], &id, &len)) {
        any = 1;
        if (id >= RX_BUFS)
            fail("vsock rx used id out of range");
        const struct vsock_hdr *h = (const struct vsock_hdr *)rx_bufs[id];
        if (len < sizeof(*h) || h->len > len - sizeof(*h))
            fail("vsock rx packet shorter than its header says");
        handle(h, rx_bufs[id] + sizeof(*h));
        post_rx((u16)id);
        vq_kick(&dev.q[0]);
    }
    return any;
}

/* Polls the rx queue until `done()` holds. */
static void wait_for(int (*done)(void), u32 seconds, const char *what)
{
    for (u64 end = deadline(seconds); !expired(end);) {
        poll_rx();
        if (done())
            return;
    }
    say_begin();
    put_str("FAIL vsock timeout waiting for ");
    put_str(what);
    put_nl();
    i8042_reset();
}

static void wait_data(struct conn *c, u32 want, const char *what)
{
    for (u64 end = deadline(20); !expired(end);) {
        poll_rx();
        if (c->rxlen >= want)
            return;
        if (c->state == CLOSED)
            fail("vsock connection reset while waiting for data");
    }
    say_begin();
    put_str("FAIL vsock timeout waiting for ");
    put_str(what);
    put_str(", got ");
    put_dec(c->rxlen);
    put_str(" bytes");
    put_nl();
    i8042_reset();
}

static void send_data(struct conn *c, const u8 *data, u32 len)
{
    while (len) {
        u32 chunk = len > 1024 ? 1024 : len;
        /* Respect the peer's receive buffer (credit-based flow control). */
        u64 end = 0;
        while (c->peer_buf_alloc - (c->tx_cnt - c->peer_fwd_cnt) < chunk) {
            if (end == 0) {
                send_pkt(c, OP_CREDIT_REQUEST, 0, NULL, 0);
                end = deadline(10);
            }
            if (expired(end))
                fail("vsock peer gave no credit");
            poll_rx();
        }
        send_pkt(c, OP_RW, 0, data, chunk);
        data += chunk;
        len -= chunk;
    }
}

static u8 pattern(u32 i, u8 first) { return (u8)(first + i % 26); }

static void expect_pattern(struct conn *c, u32 len, u8 first)
{
    for (u32 i = 0; i < len; i++)
        if (c->rx[i] != pattern(i, first))
            fail("vsock received data differs from the pattern");
}

static u8 out[2048];
static int out_reset(void) { return c_out.got_rst; }
static int none_reset(void) { return c_none.got_rst; }
static int in_established(void) { return c_in.state == ESTABLISHED; }
static int in_peer_shut(void) { return c_in.peer_shutdown != 0; }
static int in_bulk_done(void) { return c_in.bulk_left == 0; }

static void vsock_start(void)
{
    usize base = virtio_find(VIRTIO_ID_VSOCK, 0);
    if (!base)
        fail("no virtio vsock device");
    vdev_init(&dev, base, 0, 3);
    vdev_driver_ok(&dev);
    guest_cid = vdev_cfg64(&dev, 0);
    say_begin();
    put_str("vsock guest cid=");
    put_dec(guest_cid);
    put_nl();
    for (u16 i = 0; i < RX_BUFS; i++)
        post_rx(i);
    vq_kick(&dev.q[0]);
    for (u16 i = 0; i < 2; i++) {
        struct vbuf b = {&events[i], sizeof(events[i]), 1};
        vq_add(&dev.q[2], i, &b, 1);
    }
    vq_kick(&dev.q[2]);
}

/* Accepts one connection on port 5678 (refusing others), then stops
 * driving the device: the host sees what happens to streams whose guest
 * does not answer, and to open streams when the VM goes away. */
void check_vsock_halt(void)
{
    vsock_start();
    c_in.state = LISTEN;
    wait_for(in_established, 30, "a connection to port 5678");
    say("vsock accepted, halting");
    for (;;)
        __asm__ volatile("hlt");
}

void check_vsock(void)
{
    vsock_start();

    /* Listening from the start: the host may connect whenever it likes. */
    c_in.state = LISTEN;

    /* A host port nobody listens on: the connection is reset. */
    c_none.state = CONNECTING;
    send_pkt(&c_none, OP_REQUEST, 0, NULL, 0);
    wait_for(none_reset, 10, "RST from host port 4321 (no listener)");
    if (c_none.state != CLOSED)
        fail("vsock connection to a port without listener was not refused");
    log_conn(&c_none, "refused");

    /* Guest -> host: 2048 bytes out, 3000 bytes back, then a clean close
     * that the guest starts (SHUTDOWN, answered by RST). */
    c_out.state = CONNECTING;
    send_pkt(&c_out, OP_REQUEST, 0, NULL, 0);
    for (u64 end = deadline(10); c_out.state == CONNECTING;) {
        if (expired(end))
            fail("vsock timeout connecting to host port 1234");
        poll_rx();
    }
    if (c_out.state != ESTABLISHED)
        fail("vsock host refused the connection to port 1234");
    for (u32 i = 0; i < sizeof(out); i++)
        out[i] = pattern(i, 'a');
    send_data(&c_out, out, sizeof(out));
    log_conn(&c_out, "sent 2048 bytes");
    wait_data(&c_out, 3000, "3000 bytes from host port 1234");
    expect_pattern(&c_out, 3000, 'A');
    log_conn(&c_out, "received 3000 bytes ok");
    send_pkt(&c_out, OP_SHUTDOWN, SHUT_BOTH, NULL, 0);
    wait_for(out_reset, 10, "RST after our SHUTDOWN");
    log_conn(&c_out, "closed");

    /* Host -> guest: "ping" in, "pong" out, the host closes. */
    wait_for(in_established, 30, "a connection to port 5678");
    wait_data(&c_in, 15, "ping from host");
    if (memcmp(c_in.rx, "ping from host\n", 15))
        fail("vsock port 5678 did not get \"ping from host\"");
    log_conn(&c_in, "got ping");
    /* The host sends its bulk data once it has the pong. */
    c_in.bulk_left = BULK;
    send_data(&c_in, (const u8 *)"pong from guest\n", 16);
    wait_for(in_bulk_done, 60, "100000 bytes from the host on port 5678");
    log_conn(&c_in, "received 100000 bytes ok");
    for (u32 off = 0; off < BULK; off += sizeof(out)) {
        u32 n = BULK - off < sizeof(out) ? BULK - off : (u32)sizeof(out);
        for (u32 i = 0; i < n; i++)
            out[i] = bulk_pattern(off + i);
        send_data(&c_in, out, n);
    }
    log_conn(&c_in, "sent 100000 bytes");
    wait_for(in_peer_shut, 20, "the host to close port 5678");
    send_pkt(&c_in, OP_RST, 0, NULL, 0);
    c_in.state = CLOSED;
    log_conn(&c_in, "closed");
    say("vsock ok");
}
