/* Console, strings, command line and the ways out of the guest. */
#include "guest.h"

#define COM1 0x3f8
#define LSR_THR_EMPTY 0x20

const char *cmdline = "";

/* gcc may emit calls to these even in freestanding code. The loops are
 * kept from being turned back into calls to themselves by
 * -fno-tree-loop-distribute-patterns. */
void *memset(void *d, int c, usize n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, usize n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

int memcmp(const void *a, const void *b, usize n)
{
    const u8 *p = a, *q = b;
    for (; n; n--, p++, q++)
        if (*p != *q)
            return *p < *q ? -1 : 1;
    return 0;
}

usize strlen(const char *s)
{
    usize n = 0;
    while (s[n])
        n++;
    return n;
}

int starts_with(const char *s, const char *prefix)
{
    while (*prefix)
        if (*s++ != *prefix++)
            return 0;
    return 1;
}

void put_char(char c)
{
    /* Bounded: a wedged UART must not hang the check silently forever. */
    for (int i = 0; i < 100000 && !(inb(COM1 + 5) & LSR_THR_EMPTY); i++)
        ;
    outb(COM1, (u8)c);
}

void put_str(const char *s)
{
    while (*s)
        put_char(*s++);
}

void put_nl(void) { put_char('\n'); }

void put_hex(u64 v)
{
    char buf[19];
    int i = 18;
    buf[i] = 0;
    do {
        buf[--i] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    buf[--i] = 'x';
    buf[--i] = '0';
    put_str(buf + i);
}

void put_dec(u64 v)
{
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    put_str(buf + i);
}

void put_bytes(const u8 *b, usize n)
{
    for (usize i = 0; i < n; i++)
        put_char(b[i] >= 0x20 && b[i] < 0x7f ? (char)b[i] : '.');
}

void say_begin(void) { put_str("moat-test: "); }

void say(const char *s)
{
    say_begin();
    put_str(s);
    put_nl();
}

void i8042_reset(void)
{
    /* Pulse the CPU reset line through the keyboard controller. */
    outb(0x64, 0xfe);
    /* The VMM stops the vCPUs shortly after, not at the write itself. */
    for (u64 end = deadline(3); !expired(end);)
        ;
    say("FAIL i8042 reset did not stop the VM");
    for (;;)
        __asm__ volatile("hlt");
}

void fail(const char *why)
{
    say_begin();
    put_str("FAIL ");
    put_str(why);
    put_nl();
    i8042_reset();
}

void finish(void)
{
    say("done");
    i8042_reset();
}

void triple_fault(void)
{
    /* An exception with an empty IDT cannot be delivered: #UD escalates to
     * a double fault and then to a triple fault (a shutdown exit). */
    static const struct __attribute__((packed)) {
        u16 limit;
        u64 base;
    } empty_idt = {0, 0};
    __asm__ volatile("lidt %0\n\tud2" : : "m"(empty_idt));
    for (;;)
        ;
}

int cmdline_param(const char *key, char *buf, usize size)
{
    usize klen = strlen(key);
    const char *p = cmdline;
    while (*p) {
        while (*p == ' ')
            p++;
        if (starts_with(p, key) && p[klen] == '=') {
            const char *v = p + klen + 1;
            usize n = 0;
            while (v[n] && v[n] != ' ' && n + 1 < size) {
                buf[n] = v[n];
                n++;
            }
            buf[n] = 0;
            return 1;
        }
        while (*p && *p != ' ')
            p++;
    }
    return 0;
}

int parse_num(const char *s, u64 *out)
{
    const char *p = s;
    u64 v = 0;
    if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
        p += 2;
        for (;; p++) {
            u32 d;
            if (*p >= '0' && *p <= '9')
                d = (u32)(*p - '0');
            else if (*p >= 'a' && *p <= 'f')
                d = (u32)(*p - 'a' + 10);
            else if (*p >= 'A' && *p <= 'F')
                d = (u32)(*p - 'A' + 10);
            else
                break;
            v = v * 16 + d;
        }
    } else {
        for (; *p >= '0' && *p <= '9'; p++)
            v = v * 10 + (u64)(*p - '0');
    }
    *out = v;
    return (int)(p - s);
}
