/* moat test guest: runs the check named by `moat.test=` on the kernel
 * command line, reports on the serial port and resets the machine. */
#include "guest.h"

static void check_serial(void)
{
    /* A fixed text the host compares byte for byte, then the command line
     * so the host can check what the VMM passed. */
    say("serial hello 0123456789 ~!@#$%^&*()_+ ABCxyz");
    say_begin();
    put_str("cmdline: ");
    put_str(cmdline);
    put_nl();
}

static void list_devices(void)
{
    /* The device types in window order, for the host to compare with the
     * configured block, net, vsock, rng order. */
    say_begin();
    put_str("devices:");
    for (int i = 0; i < virtio_count; i++) {
        put_char(' ');
        put_dec(virtio_device_id(virtio_bases[i]));
        put_char('@');
        put_hex(virtio_bases[i]);
    }
    put_nl();
}

static void check_boot_timer(void)
{
    outb(0x3f0, 123);
    say("boot timer written");
}

void guest_main(usize boot_params)
{
    cmdline = (const char *)(usize) * (volatile u32 *)(boot_params + 0x228);
    say("guest started");
    char test[32];
    if (!cmdline_param("moat.test", test, sizeof(test)))
        fail("no moat.test= on the command line");
    virtio_discover();
    list_devices();

    if (!memcmp(test, "serial", 7)) {
        check_serial();
    } else if (!memcmp(test, "reboot", 7)) {
        say("rebooting through the i8042");
    } else if (!memcmp(test, "panicreset", 11)) {
        /* What Linux does on a panic with reboot=panic_warm: mark the reset
         * warm in the BIOS data area, then pulse the reset line. */
        say("panic reset next");
        volatile u16 *reset_mode;
        /* An address in a register: GCC refuses a constant pointer into
         * page 0. */
        __asm__ volatile("mov %1, %0" : "=r"(reset_mode) : "i"(0x472));
        *reset_mode = 0x1234;
        i8042_reset();
    } else if (!memcmp(test, "hostile", 8)) {
        check_hostile();
    } else if (!memcmp(test, "triple", 7)) {
        say("triple fault next");
        triple_fault();
    } else if (!memcmp(test, "halt", 5)) {
        /* Marks itself booted, then stays up until the host stops it
         * (API shutdown, signals). */
        outb(0x3f0, 123);
        say("halting");
        for (;;)
            __asm__ volatile("hlt");
    } else if (!memcmp(test, "boottimer", 10)) {
        check_boot_timer();
    } else if (!memcmp(test, "blkmedia", 9)) {
        check_blk_media();
    } else if (!memcmp(test, "blk", 4)) {
        check_blk();
    } else if (!memcmp(test, "net", 4)) {
        check_net();
    } else if (!memcmp(test, "vsockhalt", 10)) {
        check_vsock_halt();
    } else if (!memcmp(test, "vsock", 6)) {
        check_vsock();
    } else if (!memcmp(test, "rng", 4)) {
        check_rng();
    } else {
        fail("unknown moat.test");
    }
    finish();
}
