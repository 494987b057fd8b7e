/* virtio-rng check: two 64-byte reads, neither all zero, not equal. */
#include "guest.h"

static u8 buf[2][64];

void check_rng(void)
{
    usize base = virtio_find(VIRTIO_ID_RNG, 0);
    if (!base)
        fail("no virtio rng device");
    struct vdev d;
    vdev_init(&d, base, 0, 1);
    vdev_driver_ok(&d);
    for (u16 r = 0; r < 2; r++) {
        struct vbuf b = {buf[r], sizeof(buf[r]), 1};
        vq_add(&d.q[0], r, &b, 1);
        vq_kick(&d.q[0]);
        u32 id, len;
        vq_wait(&d.q[0], &id, &len, 10, "entropy");
        if (id != r)
            fail("rng used id is not the buffer posted");
        if (len == 0 || len > sizeof(buf[r]))
            fail("rng used length out of range");
        u8 any = 0;
        for (u32 i = 0; i < len; i++)
            any |= buf[r][i];
        say_begin();
        put_str("rng read ");
        put_dec(len);
        put_str(" bytes, first ");
        put_hex(*(u64 *)buf[r]);
        put_nl();
        if (!any)
            fail("rng bytes are all zero");
    }
    if (!memcmp(buf[0], buf[1], sizeof(buf[0])))
        fail("rng returned the same bytes twice");
    say("rng ok");
}
