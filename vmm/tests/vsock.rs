//! Hybrid vsock (Firecracker-style unix socket muxer) against the test
//! guest's own virtio-vsock driver:
//! - guest -> host port 4321 with no listener: refused (RST);
//! - guest -> host port 1234 (`<uds>_1234`): 2048 bytes up, 3000 down, the
//!   guest shuts down and the host side sees EOF;
//! - host -> unknown guest port 9999: no `OK`, the connection closes;
//! - host -> guest port 5678 (`CONNECT 5678\n`, `OK <port>\n`): ping/pong,
//!   then 100000 bytes each way through the guest's 8 KiB receive buffer
//!   (credit flow control both ways), the host closes and the guest sees
//!   SHUTDOWN;
//! - the socket is gone after the VM exits.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

fn pattern(len: usize, first: u8) -> Vec<u8> {
    (0..len).map(|i| first + (i % 26) as u8).collect()
}

/// Bulk data of port 5678 (bulk_pattern in test-guests/vsock.c).
fn bulk_pattern(len: u32) -> Vec<u8> {
    (0..len).map(|k| (k * 7 + k / 251) as u8).collect()
}
const BULK: u32 = 100_000;

/// The host end of the guest's connection to port 1234.
fn serve_port_1234(listener: UnixListener) -> Result<(), String> {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let mut s = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err("the guest never connected to port 1234".into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut got = vec![0u8; 2048];
    s.read_exact(&mut got)
        .map_err(|e| format!("reading the guest's 2048 bytes: {e}"))?;
    if got != pattern(2048, b'a') {
        return Err(format!(
            "the guest's data differs: {:?}",
            String::from_utf8_lossy(&got)
        ));
    }
    s.write_all(&pattern(3000, b'A'))
        .map_err(|e| format!("writing 3000 bytes: {e}"))?;
    // The guest's SHUTDOWN must reach us as end of stream.
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .map_err(|e| format!("waiting for EOF after the guest's SHUTDOWN: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("unexpected extra data {rest:?}"));
    }
    Ok(())
}

/// Reads one `\n`-terminated line byte by byte, so no later data is eaten.
fn read_line(s: &mut UnixStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if s.read(&mut b)? == 0 {
            break;
        }
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn connect(uds: &Path, port: u32) -> (UnixStream, String) {
    let mut s = UnixStream::connect(uds).unwrap_or_else(|e| panic!("connect {uds:?}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    writeln!(s, "CONNECT {port}").unwrap();
    let reply = read_line(&mut s).unwrap_or_else(|e| panic!("reply to CONNECT {port}: {e}"));
    (s, reply)
}

#[test]
fn streams_in_both_directions() {
    if !kvm_usable("streams_in_both_directions") {
        return;
    }
    let dir = TempDir::new("vsock");
    let uds = dir.join("v.sock");
    let listener = UnixListener::bind(dir.join("v.sock_1234")).unwrap();
    let host_1234 = std::thread::spawn(move || serve_port_1234(listener));

    let mut cmd = guest_command("vsock", "");
    cmd.args(["--vsock", &format!("cid=42,uds={}", uds.display())]);
    let mut vm = Vm::spawn(cmd);
    vm.wait_for_serial("vsock to host 1234: closed", TIMEOUT);
    host_1234.join().unwrap().unwrap();

    // Nobody listens on guest port 9999: the guest resets the request.
    let (mut s, reply) = connect(&uds, 9999);
    assert!(!reply.starts_with("OK"), "CONNECT 9999 got {reply:?}");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "data from a refused connection: {rest:?}");

    let (mut s, reply) = connect(&uds, 5678);
    let port: u32 = reply
        .strip_prefix("OK ")
        .and_then(|p| p.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("CONNECT 5678 got {reply:?}"));
    assert!(reply.ends_with('\n') && port > 0, "{reply:?}");
    s.write_all(b"ping from host\n").unwrap();
    let mut pong = [0u8; 16];
    s.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"pong from guest\n");
    s.write_all(&bulk_pattern(BULK)).unwrap();
    let mut bulk = vec![0u8; BULK as usize];
    s.read_exact(&mut bulk).unwrap();
    assert!(
        bulk == bulk_pattern(BULK),
        "bulk data from the guest differs"
    );
    drop(s);

    let exit = vm.wait(TIMEOUT);
    exit.assert_guest_ok();
    exit.assert_serial_line("devices: 19@0xd0000000");
    exit.assert_serial_line("vsock guest cid=42");
    exit.assert_serial_line("vsock to host 4321: refused");
    exit.assert_serial_line("vsock to host 1234: connected");
    exit.assert_serial_line("vsock to host 1234: received 3000 bytes ok");
    exit.assert_serial_line("vsock to host 1234: reset by peer");
    exit.assert_serial_line("vsock from host to 5678: accepted");
    exit.assert_serial_line("vsock from host to 5678: got ping");
    exit.assert_serial_line("vsock from host to 5678: received 100000 bytes ok");
    exit.assert_serial_line("vsock from host to 5678: sent 100000 bytes");
    exit.assert_serial_line("vsock from host to 5678: peer shut down");
    exit.assert_serial_line("vsock ok");
    // moat-vmm removed its socket; only our listener's remains.
    assert_eq!(dir.entries(), vec!["v.sock_1234".to_string()]);
}

/// Reads until the stream closes; fails if that takes more than `within`.
fn expect_close(s: &mut UnixStream, what: &str, within: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(within)).unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!(
            "{what}: stream not closed after {:?} ({e}); got {:?}",
            start.elapsed(),
            String::from_utf8_lossy(&got)
        ),
    }
    got
}

#[test]
fn refused_unanswered_and_orphaned_host_streams_are_closed() {
    if !kvm_usable("refused_unanswered_and_orphaned_host_streams_are_closed") {
        return;
    }
    let dir = TempDir::new("vsockbad");
    let uds = dir.join("v.sock");
    let mut cmd = guest_command("vsockhalt", "");
    cmd.args(["--vsock", &format!("cid=3,uds={}", uds.display())]);
    let mut vm = Vm::spawn(cmd);
    vm.wait_for_serial("moat-test: vsock guest cid=3", TIMEOUT);

    // Malformed requests are closed by moat-vmm without an OK.
    for bad in [
        "HELLO\n",
        "CONNECT\n",
        "CONNECT port\n",
        "CONNECT 99999999999\n",
    ] {
        let mut s = UnixStream::connect(&uds).unwrap();
        s.write_all(bad.as_bytes()).unwrap();
        let reply = expect_close(&mut s, bad, Duration::from_secs(10));
        assert!(!reply.starts_with(b"OK"), "{bad:?} got {reply:?}");
    }
    // A port the guest does not listen on: the guest resets the request.
    let (mut s, reply) = connect(&uds, 4444);
    assert!(!reply.starts_with("OK"), "CONNECT 4444 got {reply:?}");
    expect_close(&mut s, "CONNECT 4444", Duration::from_secs(10));

    let (mut open, reply) = connect(&uds, 5678);
    assert!(reply.starts_with("OK "), "CONNECT 5678 got {reply:?}");
    vm.wait_for_serial("moat-test: vsock accepted, halting", TIMEOUT);

    // The guest no longer answers: the request times out (moat-vmm waits
    // 30 s for the guest) and the stream is closed.
    let mut s = UnixStream::connect(&uds).unwrap();
    s.write_all(b"CONNECT 5678\n").unwrap();
    let reply = expect_close(&mut s, "unanswered CONNECT", Duration::from_secs(45));
    assert!(!reply.starts_with(b"OK"), "{reply:?}");

    // The VM goes away under an established stream: the host sees the end.
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(vm.pid(), libc::SIGTERM) }, 0);
    let exit = vm.wait(Duration::from_secs(20));
    exit.assert_code(0);
    let rest = expect_close(&mut open, "established stream", Duration::from_secs(10));
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(dir.entries(), Vec::<String>::new(), "left behind");
}
