/* virtio-net check: send one Ethernet frame, receive the one the host
 * injects into the tap. Both use the local experimental EtherType 0x88b5,
 * so stray host traffic (IPv6 neighbour discovery...) is told apart. */
#include "guest.h"

#define VIRTIO_NET_F_MAC (1ULL << 5)
#define NET_HDR 12 /* virtio_net_hdr_v1 */
#define ETH_TEST_TYPE 0x88b5
#define RX_BUFS 4
#define RX_BUF_SIZE 2048 /* a 1514-byte frame and the header fit */

static u8 rx_bufs[RX_BUFS][RX_BUF_SIZE];
static u8 tx_frame[NET_HDR + 64];

static void put_mac(const u8 *m)
{
    for (int i = 0; i < 6; i++) {
        if (i)
            put_char(':');
        put_char("0123456789abcdef"[m[i] >> 4]);
        put_char("0123456789abcdef"[m[i] & 15]);
    }
}

static void post_rx(struct vq *q, u16 i)
{
    struct vbuf b = {rx_bufs[i], RX_BUF_SIZE, 1};
    vq_add(q, i, &b, 1);
}

void check_net(void)
{
    usize base = virtio_find(VIRTIO_ID_NET, 0);
    if (!base)
        fail("no virtio net device");
    struct vdev d;
    vdev_init(&d, base, VIRTIO_NET_F_MAC, 2);
    vdev_driver_ok(&d);
    struct vq *rx = &d.q[0], *tx = &d.q[1];

    u8 mac[6];
    if (!(d.features & VIRTIO_NET_F_MAC))
        fail("net device offers no MAC address");
    for (u32 i = 0; i < 6; i++)
        mac[i] = vdev_cfg8(&d, i);
    say_begin();
    put_str("net mac=");
    put_mac(mac);
    put_nl();

    for (u16 i = 0; i < RX_BUFS; i++)
        post_rx(rx, i);
    vq_kick(rx);

    /* Zeroed virtio_net_hdr_v1 (no offloads), then a broadcast frame. */
    u8 *eth = tx_frame + NET_HDR;
    memset(eth, 0xff, 6);
    memcpy(eth + 6, mac, 6);
    eth[12] = ETH_TEST_TYPE >> 8;
    eth[13] = ETH_TEST_TYPE & 0xff;
    const char *payload = "moat-guest-frame 42";
    memcpy(eth + 14, payload, strlen(payload));
    struct vbuf b = {tx_frame, sizeof(tx_frame), 0};
    vq_add(tx, 0, &b, 1);
    vq_kick(tx);
    u32 id, len;
    vq_wait(tx, &id, &len, 10, "the transmitted frame");
    say("net tx done");

    for (int frames = 0; frames < 64; frames++) {
        vq_wait(rx, &id, &len, 30, "a frame from the host");
        if (id >= RX_BUFS)
            fail("net rx used id out of range");
        u8 *f = rx_bufs[id] + NET_HDR;
        if (len < NET_HDR + 14)
            fail("net rx frame shorter than an Ethernet header");
        u32 type = (u32)f[12] << 8 | f[13];
        if (type != ETH_TEST_TYPE) {
            say_begin();
            put_str("net rx ignored EtherType ");
            put_hex(type);
            put_nl();
            post_rx(rx, (u16)id);
            vq_kick(rx);
            continue;
        }
        say_begin();
        put_str("net rx len=");
        put_dec(len - NET_HDR);
        put_str(" dst=");
        put_mac(f);
        put_str(" src=");
        put_mac(f + 6);
        put_str(" num_buffers=");
        put_dec(rx_bufs[id][10] | (u32)rx_bufs[id][11] << 8);
        put_str(" payload=");
        u32 plen = len - NET_HDR - 14;
        put_bytes(f + 14, plen > 40 ? 40 : plen);
        put_nl();
        if (memcmp(f, mac, 6))
            fail("net rx frame is not addressed to our MAC");
        say("net ok");
        return;
    }
    fail("net rx: too many unrelated frames");
}
