/* virtio-blk check: every block device on the command line is probed;
 * contents follow patterns the host test shares (see README.md). */
#include "guest.h"

#define VIRTIO_BLK_F_RO (1ULL << 5)
#define VIRTIO_BLK_F_FLUSH (1ULL << 9)
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define S_OK 0
#define S_IOERR 1
#define SECTOR 512
#define WRITE_FIRST 2
#define WRITE_COUNT 4

struct blk_hdr {
    u32 type;
    u32 reserved;
    u64 sector;
};

static struct blk_hdr hdr;
static u8 status;
static u8 data[WRITE_COUNT * SECTOR] __attribute__((aligned(512)));
static u8 readback[WRITE_COUNT * SECTOR] __attribute__((aligned(512)));

/* What the host writes into every image before boot. */
static u8 host_pattern(u64 sector, u32 i) { return (u8)(sector * 31 + i * 7 + 0x5a); }
/* What the guest writes to sectors WRITE_FIRST.. of a writable disk. */
static u8 guest_pattern(u64 sector, u32 i) { return (u8)(sector * 13 + i * 3 + 0xa5); }

/* One request: header, then the data buffers, then the status byte.
 * Returns the status; `used_len` gets what the device says it wrote. */
static u8 request(struct vdev *d, u32 type, u64 sector, const struct vbuf *bufs, int n,
                  u32 *used_len)
{
    struct vbuf chain[4];
    hdr.type = type;
    hdr.reserved = 0;
    hdr.sector = sector;
    status = 0xff;
    chain[0] = (struct vbuf){&hdr, sizeof(hdr), 0};
    for (int i = 0; i < n; i++)
        chain[1 + i] = bufs[i];
    chain[1 + n] = (struct vbuf){&status, 1, 1};
    struct vq *q = &d->q[0];
    vq_add(q, 0, chain, n + 2);
    vq_kick(q);
    u32 id, len;
    vq_wait(q, &id, &len, 10, "a block request");
    if (id != 0)
        fail("blk used id is not the chain head");
    *used_len = len;
    barrier();
    return status;
}

static void say_dev(int n, const char *what)
{
    say_begin();
    put_str("blk");
    put_dec((u64)n);
    put_char(' ');
    put_str(what);
}

static void expect_pattern(int n, const u8 *buf, u64 sector, u32 count, int guest)
{
    for (u32 s = 0; s < count; s++)
        for (u32 i = 0; i < SECTOR; i++) {
            u8 want = guest ? guest_pattern(sector + s, i) : host_pattern(sector + s, i);
            if (buf[s * SECTOR + i] != want) {
                say_dev(n, "mismatch in sector ");
                put_dec(sector + s);
                put_str(" byte ");
                put_dec(i);
                put_str(": got ");
                put_hex(buf[s * SECTOR + i]);
                put_str(" want ");
                put_hex(want);
                put_nl();
                fail("blk data differs from what was expected");
            }
        }
}

static u8 read_sectors(struct vdev *d, int n, u64 sector, u32 count, u8 *buf)
{
    u32 len;
    memset(buf, 0, count * SECTOR);
    struct vbuf b = {buf, count * SECTOR, 1};
    u8 s = request(d, T_IN, sector, &b, 1, &len);
    if (s == S_OK && len != count * SECTOR + 1) {
        say_dev(n, "read used length ");
        put_dec(len);
        put_nl();
        fail("blk read used length is not data + status");
    }
    return s;
}

static void check_one(int n, usize base)
{
    struct vdev d;
    u32 len;
    vdev_init(&d, base, VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH, 1);
    vdev_driver_ok(&d);
    u64 capacity = vdev_cfg64(&d, 0);
    int ro = (d.features & VIRTIO_BLK_F_RO) != 0;
    say_dev(n, "capacity=");
    put_dec(capacity);
    put_str(" ro=");
    put_dec((u64)ro);
    put_nl();

    static char id[21];
    memset(id, 0, sizeof(id));
    struct vbuf idb = {id, 20, 1};
    u8 s = request(&d, T_GET_ID, 0, &idb, 1, &len);
    say_dev(n, "");
    if (s == S_OK) {
        put_str("serial=");
        put_str(id);
    } else {
        put_str("get-id status=");
        put_dec(s);
    }
    put_nl();

    if (capacity == 0) {
        s = read_sectors(&d, n, 0, 1, readback);
        say_dev(n, "empty read status=");
        put_dec(s);
        put_nl();
        if (s != S_IOERR)
            fail("blk read from an empty device did not fail with IOERR");
        return;
    }

    if (read_sectors(&d, n, 0, 1, readback) != S_OK)
        fail("blk read of sector 0 failed");
    expect_pattern(n, readback, 0, 1, 0);
    say_dev(n, "read sector 0 ok\n");

    if (ro) {
        for (u32 i = 0; i < SECTOR; i++)
            data[i] = guest_pattern(0, i);
        struct vbuf b = {data, SECTOR, 0};
        s = request(&d, T_OUT, 0, &b, 1, &len);
        say_dev(n, "ro write status=");
        put_dec(s);
        put_nl();
        if (s != S_IOERR)
            fail("blk write to a read-only device did not fail with IOERR");
        if (read_sectors(&d, n, 0, 1, readback) != S_OK)
            fail("blk read after the refused write failed");
        expect_pattern(n, readback, 0, 1, 0);
        say_dev(n, "ro write rejected, data unchanged\n");
        return;
    }

    if (capacity < WRITE_FIRST + WRITE_COUNT + 1)
        fail("blk writable test disk is too small");
    for (u32 sct = 0; sct < WRITE_COUNT; sct++)
        for (u32 i = 0; i < SECTOR; i++)
            data[sct * SECTOR + i] = guest_pattern(WRITE_FIRST + sct, i);
    /* Two data descriptors, so the device has to gather a chain. */
    struct vbuf halves[2] = {
        {data, WRITE_COUNT * SECTOR / 2, 0},
        {data + WRITE_COUNT * SECTOR / 2, WRITE_COUNT * SECTOR / 2, 0},
    };
    if ((s = request(&d, T_OUT, WRITE_FIRST, halves, 2, &len)) != S_OK) {
        say_dev(n, "write status=");
        put_dec(s);
        put_nl();
        fail("blk write failed");
    }
    if (read_sectors(&d, n, WRITE_FIRST, WRITE_COUNT, readback) != S_OK)
        fail("blk read back failed");
    expect_pattern(n, readback, WRITE_FIRST, WRITE_COUNT, 1);
    /* The neighbours must be untouched. */
    if (read_sectors(&d, n, WRITE_FIRST + WRITE_COUNT, 1, readback) != S_OK)
        fail("blk read after the written range failed");
    expect_pattern(n, readback, WRITE_FIRST + WRITE_COUNT, 1, 0);

    s = read_sectors(&d, n, capacity, 1, readback);
    say_dev(n, "read past the end status=");
    put_dec(s);
    put_nl();
    if (s != S_IOERR)
        fail("blk read past the end did not fail with IOERR");

    if (d.features & VIRTIO_BLK_F_FLUSH) {
        if ((s = request(&d, T_FLUSH, 0, NULL, 0, &len)) != S_OK)
            fail("blk flush failed");
        say_dev(n, "flush ok\n");
    }
    say_dev(n, "write/read ok\n");
}

void check_blk(void)
{
    int n = 0;
    for (usize base; (base = virtio_find(VIRTIO_ID_BLOCK, n)) != 0; n++)
        check_one(n, base);
    if (n == 0)
        fail("no virtio block device");
    say("blk all ok");
}

/* The first block device starts empty; the host fills it through the
 * control API (PUT /block/<id>, read-only) while the guest polls. */
void check_blk_media(void)
{
    usize base = virtio_find(VIRTIO_ID_BLOCK, 0);
    if (!base)
        fail("no virtio block device");
    struct vdev d;
    u32 len;
    vdev_init(&d, base, VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH, 1);
    vdev_driver_ok(&d);
    if (vdev_cfg64(&d, 0) != 0)
        fail("blk device is not empty at boot");
    u32 gen = vdev_generation(&d);
    vdev_take_interrupts(&d);
    say("blk0 empty, waiting for media");
    u64 capacity = 0;
    u32 irq = 0;
    for (u64 end = deadline(30); !capacity; ) {
        if (expired(end))
            fail("blk capacity did not change");
        capacity = vdev_cfg64(&d, 0);
    }
    /* The config-change interrupt may trail the new capacity briefly. */
    for (u64 end = deadline(2); !(irq & 2) && !expired(end);)
        irq |= vdev_take_interrupts(&d);
    say_dev(0, "media capacity=");
    put_dec(capacity);
    put_str(" config-interrupt=");
    put_dec((irq & 2) != 0);
    put_str(" generation-changed=");
    put_dec(vdev_generation(&d) != gen);
    put_nl();
    if (read_sectors(&d, 0, 0, 1, readback) != S_OK)
        fail("blk read of the new media failed");
    expect_pattern(0, readback, 0, 1, 0);
    say_dev(0, "media read sector 0 ok\n");
    for (u32 i = 0; i < SECTOR; i++)
        data[i] = guest_pattern(0, i);
    struct vbuf b = {data, SECTOR, 0};
    u8 s = request(&d, T_OUT, 0, &b, 1, &len);
    say_dev(0, "media write status=");
    put_dec(s);
    put_nl();
}
