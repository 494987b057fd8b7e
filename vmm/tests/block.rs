//! virtio-blk through the test guest's polling driver: capacity, reads of
//! host-written data, writes that reach the image file, GET_ID serials,
//! read-only devices, requests past the end, and empty (spare) slots.

mod common;

use std::process::Command;

use common::*;

const RW_SECTORS: u64 = 64;
const RO_SECTORS: u64 = 16;

/// Sectors the guest writes on a writable disk (blk.c: WRITE_FIRST, COUNT).
const WRITTEN: std::ops::Range<u64> = 2..6;

fn check_image(path: &std::path::Path, sectors: u64, written: std::ops::Range<u64>) {
    let data = std::fs::read(path).unwrap();
    assert_eq!(data.len() as u64, sectors * 512, "image size changed");
    for (o, &b) in data.iter().enumerate() {
        let (s, i) = (o as u64 / 512, o as u64 % 512);
        let want = if written.contains(&s) {
            guest_pattern(s, i)
        } else {
            host_pattern(s, i)
        };
        assert_eq!(b, want, "{path:?}: sector {s} byte {i}");
    }
}

#[test]
fn read_write_get_id_read_only_and_spare_devices() {
    if !kvm_usable("read_write_get_id_read_only_and_spare_devices") {
        return;
    }
    let dir = TempDir::new("blk");
    let rw = dir.join("rw.img");
    let ro = dir.join("ro.img");
    make_image(&rw, RW_SECTORS);
    make_image(&ro, RO_SECTORS);
    let exit = run_guest(
        "blk",
        &[
            "--block",
            &format!("id=disk0,path={},serial=moat-disk-0", rw.display()),
            "--block",
            &format!("id=layer,path={},ro,serial=layer-sha256-ab", ro.display()),
            "--block",
            "id=spare",
        ],
    );
    exit.assert_guest_ok();
    exit.assert_serial_line("devices: 2@0xd0000000 2@0xd0001000 2@0xd0002000");

    exit.assert_serial_line(&format!("blk0 capacity={RW_SECTORS} ro=0"));
    exit.assert_serial_line("blk0 serial=moat-disk-0");
    exit.assert_serial_line("blk0 read sector 0 ok");
    exit.assert_serial_line("blk0 read past the end status=1");
    exit.assert_serial_line("blk0 write/read ok");

    exit.assert_serial_line(&format!("blk1 capacity={RO_SECTORS} ro=1"));
    exit.assert_serial_line("blk1 serial=layer-sha256-ab");
    exit.assert_serial_line("blk1 read sector 0 ok");
    exit.assert_serial_line("blk1 ro write status=1");
    exit.assert_serial_line("blk1 ro write rejected, data unchanged");

    exit.assert_serial_line("blk2 capacity=0 ro=0");
    exit.assert_serial_line("blk2 empty read status=1");
    exit.assert_serial_line("blk all ok");

    // The guest's writes reached the file, and nothing else changed.
    check_image(&rw, RW_SECTORS, WRITTEN);
    check_image(&ro, RO_SECTORS, 0..0);
}

#[test]
fn block_devices_from_a_json_config() {
    if !kvm_usable("block_devices_from_a_json_config") {
        return;
    }
    let dir = TempDir::new("blkjson");
    let ro = dir.join("ro.img");
    let rw = dir.join("rw.img");
    make_image(&ro, RO_SECTORS);
    make_image(&rw, 8);
    let config = serde_json::json!({
        "kernel": guest(),
        "memory_mib": 32,
        "cmdline": "moat.test=blk",
        "block": [
            { "id": "layer0", "path": ro, "read_only": true, "serial": "layer0" },
            { "id": "scratch", "path": rw },
        ],
    });
    let path = dir.join("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let mut cmd = Command::new(VMM);
    cmd.arg("--config").arg(&path);
    let exit = run(cmd);
    exit.assert_guest_ok();
    exit.assert_serial_line(&format!("blk0 capacity={RO_SECTORS} ro=1"));
    exit.assert_serial_line("blk0 serial=layer0");
    exit.assert_serial_line("blk0 ro write rejected, data unchanged");
    exit.assert_serial_line("blk1 capacity=8 ro=0");
    exit.assert_serial_line("blk1 write/read ok");
    check_image(&ro, RO_SECTORS, 0..0);
    check_image(&rw, 8, WRITTEN);
}

#[test]
fn api_fills_a_spare_device_while_the_guest_runs() {
    if !kvm_usable("api_fills_a_spare_device_while_the_guest_runs") {
        return;
    }
    let dir = TempDir::new("blkapi");
    let api_sock = dir.join("api.sock");
    let img = dir.join("layer.img");
    make_image(&img, RO_SECTORS);
    let mut cmd = guest_command("blkmedia", "");
    cmd.args(["--block", "id=spare"])
        .arg("--api-socket")
        .arg(&api_sock);
    let mut vm = Vm::spawn(cmd);
    vm.wait_for_serial("blk0 empty, waiting for media", TIMEOUT);

    let (code, body) = vm.api(&api_sock, "PUT", "/block/nope", r#"{"path": "/dev/null"}"#);
    assert_eq!(code, 404, "{body}");
    let missing = serde_json::json!({ "path": dir.join("missing.img") }).to_string();
    let (code, body) = vm.api(&api_sock, "PUT", "/block/spare", &missing);
    assert!((400..500).contains(&code), "{code} {body}");

    let fill = serde_json::json!({ "path": img, "read_only": true }).to_string();
    let (code, body) = vm.api(&api_sock, "PUT", "/block/spare", &fill);
    assert_eq!(code, 200, "{body}");
    let exit = vm.wait(TIMEOUT);
    exit.assert_guest_ok();
    exit.assert_serial_line(&format!(
        "blk0 media capacity={RO_SECTORS} config-interrupt=1 generation-changed=1"
    ));
    exit.assert_serial_line("blk0 media read sector 0 ok");
    // Read-only by the API's word, though the guest negotiated a writable
    // device at boot.
    exit.assert_serial_line("blk0 media write status=1");
    check_image(&img, RO_SECTORS, 0..0);
}
