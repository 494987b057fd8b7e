/* Hostile checks: a guest that attacks the VMM's devices in rounds, until
 * the host stops it. Each round, for every virtio device: corrupt avail
 * rings, then descriptor chains that loop (each time the device must answer
 * with DEVICE_NEEDS_RESET and a config-change interrupt, and come back after
 * a reset), then a storm of resets and activations; then an i8042 flood
 * (commands whose answers are never read) and a console flood. */
#include "guest.h"

#define S_DEVICE_NEEDS_RESET 0x40
#define INT_CONFIG_CHANGE 2
#define RESET_STORM 10
#define I8042_FLOOD 20000
#define CONSOLE_FLOOD_LINES 64

static int queue_count(u32 type)
{
    switch (type) {
    case VIRTIO_ID_NET:
        return 2;
    case VIRTIO_ID_VSOCK:
        return 3;
    default:
        return 1;
    }
}

static void start_device(struct vdev *d, usize base)
{
    /* The previous activation of this device was reset: its rings are
     * free again. */
    virtio_reuse_rings();
    vdev_init(d, base, 0, queue_count(virtio_device_id(base)));
    vdev_driver_ok(d);
}

/* Publishes an avail index a queue size and more past the device's. */
static void corrupt_rings(struct vdev *d, int nqueues)
{
    for (int i = 0; i < nqueues; i++) {
        struct vq *q = &d->q[i];
        q->avail[1] = (u16)(q->num + 5);
        barrier();
        vq_kick(q);
    }
}

static u8 scratch[64];

/* Publishes on every queue a chain of one descriptor that is its own next.
 * The device serves at least its tx (or request) queue on the kick. */
static void loop_chains(struct vdev *d, int nqueues)
{
    for (int i = 0; i < nqueues; i++) {
        struct vq *q = &d->q[i];
        q->desc[0].addr = (u64)(usize)scratch;
        q->desc[0].len = sizeof(scratch);
        q->desc[0].flags = VRING_DESC_F_NEXT;
        q->desc[0].next = 0;
        q->avail[2 + q->avail_idx % q->num] = 0;
        barrier(); /* the descriptor and ring entry before the index */
        q->avail_idx++;
        q->avail[1] = q->avail_idx;
        barrier();
        vq_kick(q);
    }
}

/* Starts the device at `base`, attacks it, and checks that it asks for a
 * reset and takes one; `unanswered` says what went unanswered. */
static void needs_reset_after(usize base, void (*attack)(struct vdev *, int),
                              const char *unanswered)
{
    struct vdev d;
    start_device(&d, base);
    attack(&d, queue_count(d.device_id));
    u64 end = deadline(10);
    while (!(vdev_status(&d) & S_DEVICE_NEEDS_RESET))
        if (expired(end))
            fail(unanswered);
    if (!(vdev_take_interrupts(&d) & INT_CONFIG_CHANGE))
        fail("no config-change interrupt with DEVICE_NEEDS_RESET");
    vdev_reset(&d);
    if (vdev_status(&d) != 0)
        fail("status not 0 after resetting a device that needed it");
}

static void reset_storm(usize base)
{
    struct vdev d;
    for (int i = 0; i < RESET_STORM; i++) {
        start_device(&d, base);
        vdev_reset(&d);
    }
}

static void i8042_flood(void)
{
    /* "Read controller config" fills the output queue; nobody reads it. */
    for (int i = 0; i < I8042_FLOOD; i++)
        outb(0x64, 0x20);
}

static void console_flood(void)
{
    for (int i = 0; i < CONSOLE_FLOOD_LINES; i++)
        say("flood 0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz");
}

void check_hostile(void)
{
    for (u64 round = 1;; round++) {
        for (int i = 0; i < virtio_count; i++) {
            needs_reset_after(virtio_bases[i], corrupt_rings,
                              "no DEVICE_NEEDS_RESET after a corrupt avail ring");
            needs_reset_after(virtio_bases[i], loop_chains,
                              "no DEVICE_NEEDS_RESET after a looping chain");
            reset_storm(virtio_bases[i]);
        }
        i8042_flood();
        console_flood();
        say_begin();
        put_str("hostile round ");
        put_dec(round);
        put_str(" ok");
        put_nl();
    }
}
