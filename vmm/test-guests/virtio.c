/* A polling virtio-mmio 1.x (modern) driver with split virtqueues. No
 * interrupts: the guest runs with IF=0 and polls the used rings. */
#include "guest.h"

#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INTERRUPT_STATUS 0x060
#define R_INTERRUPT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC_LOW 0x080
#define R_QUEUE_DESC_HIGH 0x084
#define R_QUEUE_DRIVER_LOW 0x090
#define R_QUEUE_DRIVER_HIGH 0x094
#define R_QUEUE_DEVICE_LOW 0x0a0
#define R_QUEUE_DEVICE_HIGH 0x0a4
#define R_CONFIG_GENERATION 0x0fc
#define R_CONFIG 0x100

#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_FAILED 128

#define VIRTIO_MAGIC 0x74726976 /* "virt" */

/* Ring memory: one page per queue. Descriptors at 0 (16 * 16 bytes),
 * the available ring at 256, the used ring at 1024 (4-byte aligned). */
#define MAX_RINGS 16
static u8 ring_pages[MAX_RINGS][4096] __attribute__((aligned(4096)));
static int rings_used;

usize virtio_bases[MAX_DEVICES];
int virtio_count;

/* Takes the windows from the `virtio_mmio.device=4K@0xBASE:IRQ` words the
 * VMM put on the command line, as Linux does. */
void virtio_discover(void)
{
    const char *key = "virtio_mmio.device=";
    const char *p = cmdline;
    virtio_count = 0;
    while (*p && virtio_count < MAX_DEVICES) {
        while (*p == ' ')
            p++;
        if (starts_with(p, key)) {
            const char *at = p + strlen(key);
            while (*at && *at != '@' && *at != ' ')
                at++;
            if (*at == '@') {
                u64 base;
                if (parse_num(at + 1, &base) > 0)
                    virtio_bases[virtio_count++] = (usize)base;
            }
        }
        while (*p && *p != ' ')
            p++;
    }
}

static u32 rd(struct vdev *d, u32 off) { return mmio_read32(d->base + off); }
static void wr(struct vdev *d, u32 off, u32 v) { mmio_write32(d->base + off, v); }

u32 virtio_device_id(usize base)
{
    if (mmio_read32(base + R_MAGIC) != VIRTIO_MAGIC)
        return 0;
    return mmio_read32(base + R_DEVICE_ID);
}

usize virtio_find(u32 type, int n)
{
    for (int i = 0; i < virtio_count; i++)
        if (virtio_device_id(virtio_bases[i]) == type && n-- == 0)
            return virtio_bases[i];
    return 0;
}

static void setup_queue(struct vdev *d, u16 index)
{
    struct vq *q = &d->q[index];
    if (rings_used == MAX_RINGS)
        fail("out of ring pages");
    u8 *page = ring_pages[rings_used++];
    memset(page, 0, 4096);

    wr(d, R_QUEUE_SEL, index);
    if (rd(d, R_QUEUE_READY) != 0)
        fail("queue ready before setup");
    u32 max = rd(d, R_QUEUE_NUM_MAX);
    if (max == 0)
        fail("queue not available (QueueNumMax 0)");
    q->num = max < VQ_SIZE ? (u16)max : VQ_SIZE;
    q->desc = (struct vring_desc *)page;
    q->avail = (volatile u16 *)(page + 256);
    q->used = page + 1024;
    q->avail_idx = 0;
    q->last_used = 0;
    q->index = index;
    q->dev = d;

    wr(d, R_QUEUE_NUM, q->num);
    wr(d, R_QUEUE_DESC_LOW, (u32)(usize)q->desc);
    wr(d, R_QUEUE_DESC_HIGH, (u32)((u64)(usize)q->desc >> 32));
    wr(d, R_QUEUE_DRIVER_LOW, (u32)(usize)q->avail);
    wr(d, R_QUEUE_DRIVER_HIGH, (u32)((u64)(usize)q->avail >> 32));
    wr(d, R_QUEUE_DEVICE_LOW, (u32)(usize)q->used);
    wr(d, R_QUEUE_DEVICE_HIGH, (u32)((u64)(usize)q->used >> 32));
    wr(d, R_QUEUE_READY, 1);
    if (rd(d, R_QUEUE_READY) != 1)
        fail("QueueReady does not read back 1");
}

void vdev_init(struct vdev *d, usize base, u64 wanted, int nqueues)
{
    memset(d, 0, sizeof(*d));
    d->base = base;
    if (rd(d, R_MAGIC) != VIRTIO_MAGIC)
        fail("virtio-mmio magic value wrong");
    if (rd(d, R_VERSION) != 2)
        fail("virtio-mmio version is not 2 (modern)");
    d->device_id = rd(d, R_DEVICE_ID);

    wr(d, R_STATUS, 0);
    if (rd(d, R_STATUS) != 0)
        fail("device status not 0 after reset");
    wr(d, R_STATUS, S_ACKNOWLEDGE);
    wr(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER);

    wr(d, R_DEVICE_FEATURES_SEL, 0);
    u64 offered = rd(d, R_DEVICE_FEATURES);
    wr(d, R_DEVICE_FEATURES_SEL, 1);
    offered |= (u64)rd(d, R_DEVICE_FEATURES) << 32;
    d->offered = offered;
    if (!(offered & VIRTIO_F_VERSION_1))
        fail("device does not offer VIRTIO_F_VERSION_1");
    d->features = offered & (wanted | VIRTIO_F_VERSION_1);
    wr(d, R_DRIVER_FEATURES_SEL, 0);
    wr(d, R_DRIVER_FEATURES, (u32)d->features);
    wr(d, R_DRIVER_FEATURES_SEL, 1);
    wr(d, R_DRIVER_FEATURES, (u32)(d->features >> 32));
    wr(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if (!(rd(d, R_STATUS) & S_FEATURES_OK)) {
        wr(d, R_STATUS, S_FAILED);
        fail("device refused FEATURES_OK");
    }
    for (int i = 0; i < nqueues; i++)
        setup_queue(d, (u16)i);
}

void virtio_reuse_rings(void) { rings_used = 0; }

u32 vdev_status(struct vdev *d) { return rd(d, R_STATUS); }

void vdev_reset(struct vdev *d) { wr(d, R_STATUS, 0); }

void vdev_driver_ok(struct vdev *d)
{
    wr(d, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    u32 s = rd(d, R_STATUS);
    if (s & S_FAILED || !(s & S_DRIVER_OK))
        fail("device status after DRIVER_OK is not ok");
}

/* Config fields are read with 32-bit (or narrower) accesses; a 64-bit one
 * is read twice if the generation changed in between, as the spec asks. */
u8 vdev_cfg8(struct vdev *d, u32 off) { return *(volatile u8 *)(d->base + R_CONFIG + off); }
u32 vdev_generation(struct vdev *d) { return rd(d, R_CONFIG_GENERATION); }

u32 vdev_take_interrupts(struct vdev *d)
{
    u32 s = rd(d, R_INTERRUPT_STATUS);
    wr(d, R_INTERRUPT_ACK, s);
    return s;
}

u32 vdev_cfg32(struct vdev *d, u32 off) { return rd(d, R_CONFIG + off); }
u64 vdev_cfg64(struct vdev *d, u32 off)
{
    for (;;) {
        u32 gen = rd(d, R_CONFIG_GENERATION);
        u64 v = rd(d, R_CONFIG + off) | (u64)rd(d, R_CONFIG + off + 4) << 32;
        if (rd(d, R_CONFIG_GENERATION) == gen)
            return v;
    }
}

void vq_add(struct vq *q, u16 head, const struct vbuf *bufs, int n)
{
    for (int i = 0; i < n; i++) {
        u16 idx = (u16)((head + i) % q->num);
        struct vring_desc *desc = &q->desc[idx];
        desc->addr = (u64)(usize)bufs[i].addr;
        desc->len = bufs[i].len;
        desc->flags = (u16)((bufs[i].device_writes ? VRING_DESC_F_WRITE : 0) |
                            (i + 1 < n ? VRING_DESC_F_NEXT : 0));
        desc->next = (u16)((idx + 1) % q->num);
    }
    q->avail[2 + q->avail_idx % q->num] = head;
    barrier(); /* the ring entry before the index that publishes it */
    q->avail_idx++;
    q->avail[1] = q->avail_idx;
    barrier();
}

void vq_kick(struct vq *q) { wr(q->dev, R_QUEUE_NOTIFY, q->index); }

int vq_used(struct vq *q, u32 *id, u32 *len)
{
    u16 used_idx = *(volatile u16 *)(q->used + 2);
    if (used_idx == q->last_used)
        return 0;
    barrier(); /* read the element only after seeing the index */
    volatile u32 *elem = (volatile u32 *)(q->used + 4 + 8 * (q->last_used % q->num));
    *id = elem[0];
    *len = elem[1];
    q->last_used++;
    /* Acknowledge the used-ring interrupt; nobody takes it. A config
     * change stays pending for whoever waits for one. */
    wr(q->dev, R_INTERRUPT_ACK, rd(q->dev, R_INTERRUPT_STATUS) & 1);
    return 1;
}

void vq_wait(struct vq *q, u32 *id, u32 *len, u32 seconds, const char *what)
{
    for (u64 end = deadline(seconds); !expired(end);)
        if (vq_used(q, id, len))
            return;
    say_begin();
    put_str("FAIL timeout waiting for ");
    put_str(what);
    put_nl();
    i8042_reset();
}
