/* Shared declarations of the moat test guest (freestanding, integer only). */
#ifndef MOAT_GUEST_H
#define MOAT_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long usize;

#define NULL ((void *)0)

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
/* Orders our ring writes against the device: x86 keeps stores in order, so
 * stopping the compiler from reordering is enough. */
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

static inline u32 mmio_read32(usize addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(usize addr, u32 v) { *(volatile u32 *)addr = v; }

/* Timeouts use the TSC: iteration counts would mean very different times
 * in the PVM host's instruction emulator (which runs ring-0 code about
 * 1000x slower) and on hardware KVM. The TSC rate is assumed; real TSCs
 * run at 1-4 GHz, so timeouts are approximate, which is all polls need. */
#define TSC_PER_SEC 2500000000ULL
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (u64)hi << 32 | lo;
}
static inline u64 deadline(u32 seconds) { return rdtsc() + seconds * TSC_PER_SEC; }
static inline int expired(u64 when) { return rdtsc() > when; }

/* lib.c */
void *memset(void *d, int c, usize n);
void *memcpy(void *d, const void *s, usize n);
int memcmp(const void *a, const void *b, usize n);
usize strlen(const char *s);
int starts_with(const char *s, const char *prefix);
void put_char(char c);
void put_str(const char *s);
void put_hex(u64 v);
void put_dec(u64 v);
void put_bytes(const u8 *b, usize n); /* printable ASCII, others as '.' */
void say(const char *s);              /* "moat-test: " s "\n" */
void say_begin(void);                 /* "moat-test: " */
void put_nl(void);
__attribute__((noreturn)) void fail(const char *why);
__attribute__((noreturn)) void finish(void);
__attribute__((noreturn)) void i8042_reset(void);
__attribute__((noreturn)) void triple_fault(void);
extern const char *cmdline;
/* Value of `key=` on the command line, copied into buf; 0 if absent. */
int cmdline_param(const char *key, char *buf, usize size);
/* Parses 0x-prefixed hex or decimal; returns the number of chars used. */
int parse_num(const char *s, u64 *out);

/* virtio.c */
struct vring_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

#define VQ_SIZE 16
struct vq {
    struct vring_desc *desc;
    volatile u16 *avail; /* flags, idx, ring[VQ_SIZE] */
    volatile u8 *used;   /* flags, idx, ring[VQ_SIZE] of {u32 id, u32 len} */
    u16 num;
    u16 avail_idx;
    u16 last_used;
    u16 index;
    struct vdev *dev;
};

struct vbuf {
    void *addr;
    u32 len;
    int device_writes;
};

#define MAX_QUEUES 3
struct vdev {
    usize base;
    u32 device_id;
    u64 offered;
    u64 features;
    struct vq q[MAX_QUEUES];
};

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_RNG 4
#define VIRTIO_ID_VSOCK 19
#define VIRTIO_F_VERSION_1 (1ULL << 32)

#define MAX_DEVICES 24
/* Every virtio_mmio.device= window on the command line, in order. */
extern usize virtio_bases[MAX_DEVICES];
extern int virtio_count;
void virtio_discover(void);
u32 virtio_device_id(usize base);
/* Finds the n-th (from 0) device of a type; 0 if none. */
usize virtio_find(u32 type, int n);
/* Resets and initialises the device, negotiating VERSION_1 plus the offered
 * subset of `wanted`, and sets up `nqueues` queues (not yet DRIVER_OK). */
void vdev_init(struct vdev *d, usize base, u64 wanted, int nqueues);
void vdev_driver_ok(struct vdev *d);
/* The device status register. */
u32 vdev_status(struct vdev *d);
/* Writes status 0: the device stops and forgets its queues. */
void vdev_reset(struct vdev *d);
/* Frees every ring page for the next vdev_init: only once the devices
 * that used them were reset. */
void virtio_reuse_rings(void);
u8 vdev_cfg8(struct vdev *d, u32 off);
u32 vdev_generation(struct vdev *d);
/* InterruptStatus (bit 0 used ring, bit 1 config change); acknowledges. */
u32 vdev_take_interrupts(struct vdev *d);
u32 vdev_cfg32(struct vdev *d, u32 off);
u64 vdev_cfg64(struct vdev *d, u32 off);
/* Chains bufs into descriptors head.., publishes the chain; no notify. */
void vq_add(struct vq *q, u16 head, const struct vbuf *bufs, int n);
void vq_kick(struct vq *q);
/* Next used element, if any: returns 1 and fills id/len. */
int vq_used(struct vq *q, u32 *id, u32 *len);
/* Waits up to `seconds` for a used element; fails the check on timeout. */
void vq_wait(struct vq *q, u32 *id, u32 *len, u32 seconds, const char *what);

/* checks */
void check_blk(void);
void check_blk_media(void);
void check_net(void);
void check_vsock(void);
void check_vsock_halt(void);
void check_rng(void);
void check_hostile(void);

#endif
