//! virtio-net over a tap: the test creates a network namespace with a tap,
//! runs moat-vmm inside it, captures the guest's frame with an AF_PACKET
//! socket on the tap and injects one back, which the guest must receive.
//! The same VM also has a block device, vsock and rng, to check the order
//! of the virtio-mmio windows (block, net, vsock, rng).

mod common;

use std::time::{Duration, Instant};

use common::*;

const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x2a];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// EtherType the guest uses (IEEE local experimental).
const ETH_TEST: [u8; 2] = [0x88, 0xb5];

#[test]
fn frames_both_ways_through_a_tap() {
    if !kvm_usable("frames_both_ways_through_a_tap")
        || !netns_usable("frames_both_ways_through_a_tap")
    {
        return;
    }
    let dir = TempDir::new("net");
    let img = dir.join("d.img");
    make_image(&img, 8);
    let ns = Netns::new("net");
    ns.add_tap("mtap0");
    let sock = ns.run_inside(|| PacketSocket::bind("mtap0").expect("AF_PACKET socket on mtap0"));

    let mut cmd = ns.command(VMM);
    cmd.arg("--kernel")
        .arg(guest())
        .args(["--memory-mib", GUEST_MEMORY_MIB])
        .args(["--cmdline", "moat.test=net"])
        .args(["--block", &format!("id=d0,path={}", img.display())])
        .args(["--net", "id=eth0,tap=mtap0,mac=02:00:00:00:00:2a"])
        .args([
            "--vsock",
            &format!("cid=3,uds={}", dir.join("v.sock").display()),
        ])
        .arg("--rng");
    let vm = Vm::spawn(cmd);

    // The guest broadcasts one frame of our EtherType; other traffic on the
    // tap (IPv6 neighbour discovery...) is skipped.
    let deadline = Instant::now() + TIMEOUT;
    let frame = loop {
        assert!(Instant::now() < deadline, "no frame from the guest");
        if let Some(f) = sock.recv().unwrap() {
            if f.len() >= 14 && f[12..14] == ETH_TEST {
                break f;
            }
        }
    };
    assert_eq!(frame[0..6], [0xff; 6], "destination: {frame:02x?}");
    assert_eq!(frame[6..12], GUEST_MAC, "source: {frame:02x?}");
    // The guest sends 64 bytes after the 12-byte virtio_net_hdr_v1, which
    // must not reach the wire.
    assert_eq!(frame.len(), 64, "{frame:02x?}");
    assert!(
        frame[14..].starts_with(b"moat-guest-frame 42"),
        "{frame:02x?}"
    );

    // First a frame the guest must skip (and recycle the buffer of), then
    // a full-size one for it.
    let frame = |ethertype: &[u8], payload: &[u8], len: usize| {
        let mut f = Vec::new();
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&HOST_MAC);
        f.extend_from_slice(ethertype);
        f.extend_from_slice(payload);
        f.resize(len, 0x33);
        f
    };
    sock.send(&frame(&[0x08, 0x00], b"not for the test", 60))
        .unwrap();
    sock.send(&frame(&ETH_TEST, b"moat-host-frame 7", 1514))
        .unwrap();

    let exit = vm.wait(Duration::from_secs(60));
    exit.assert_guest_ok();
    exit.assert_serial_line("devices: 2@0xd0000000 1@0xd0001000 19@0xd0002000 4@0xd0003000");
    exit.assert_serial_line("net mac=02:00:00:00:00:2a");
    exit.assert_serial_line("net tx done");
    let rx = exit.serial_value("net rx len=");
    assert!(
        rx.starts_with("1514 dst=02:00:00:00:00:2a src=02:00:00:00:00:01 "),
        "{rx:?}"
    );
    assert!(rx.contains(" payload=moat-host-frame 7"), "{rx:?}");
    // Without VIRTIO_NET_F_MRG_RXBUF every frame takes one buffer.
    assert!(rx.contains(" num_buffers=1 "), "{rx:?}");
    exit.assert_serial_line("net rx ignored EtherType 0x800");
    exit.assert_serial_line("net ok");
}

#[test]
fn a_tap_in_use_is_refused() {
    if !kvm_usable("a_tap_in_use_is_refused") || !netns_usable("a_tap_in_use_is_refused") {
        return;
    }
    let ns = Netns::new("busy");
    ns.add_tap("mtap0");
    let vm_command = |test: &str| {
        let mut cmd = ns.command(VMM);
        cmd.arg("--kernel")
            .arg(guest())
            .args(["--memory-mib", GUEST_MEMORY_MIB])
            .args(["--cmdline", &format!("moat.test={test}")])
            .args(["--net", "id=eth0,tap=mtap0"]);
        cmd
    };
    let mut first = Vm::spawn(vm_command("halt"));
    first.wait_for_serial("moat-test: halting", TIMEOUT);
    // A single-queue tap takes one reader: a second VM must not share it.
    let second = run(vm_command("reboot"));
    second.assert_setup_error("mtap0");
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(first.pid(), libc::SIGTERM) }, 0);
    first.wait(Duration::from_secs(20)).assert_code(0);
    // Free again once the first VM is gone.
    run(vm_command("reboot")).assert_guest_ok();
}
