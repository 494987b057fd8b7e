//! virtio-rng: the guest reads entropy twice and checks it looks random.

mod common;

use common::*;

#[test]
fn guest_reads_random_bytes() {
    if !kvm_usable("guest_reads_random_bytes") {
        return;
    }
    let exit = run_guest("rng", &["--rng"]);
    exit.assert_guest_ok();
    exit.assert_serial_line("devices: 4@0xd0000000");
    let reads: Vec<&str> = exit
        .stdout
        .lines()
        .filter(|l| l.starts_with("moat-test: rng read "))
        .collect();
    assert_eq!(reads.len(), 2, "{exit:?}");
    // The guest asked for 64 bytes; a device may return fewer, never none.
    for r in &reads {
        assert!(!r.starts_with("moat-test: rng read 0 "), "{r}");
    }
    assert_ne!(reads[0], reads[1], "the same bytes twice");
    exit.assert_serial_line("rng ok");
}

#[test]
fn no_rng_device_without_the_flag() {
    if !kvm_usable("no_rng_device_without_the_flag") {
        return;
    }
    let exit = run_guest("rng", &[]);
    exit.assert_serial_line("FAIL no virtio rng device");
    exit.assert_code(0);
}
