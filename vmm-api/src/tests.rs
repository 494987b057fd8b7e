//! The configuration's flags, JSON and checks.

use std::path::Path;

use crate::config::*;
use crate::limits::MAX_VCPUS;

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

#[test]
fn parses_flags() {
    let cfg = VmConfig::from_args(args(
        "--kernel /k --vcpus 2 --memory-mib 128 --serial file:/tmp/s \
         --block id=a,path=/d,ro,serial=layer0 --block id=spare \
         --net id=n,tap=tap0,mac=02:00:00:00:00:01 --vsock cid=3,uds=/tmp/v --rng --no-seccomp \
         --jail 1000:100 --jail-rw /run/x --jail-ro /var/y --jail-ro /var/z",
    ))
    .unwrap();
    assert_eq!(
        cfg.jail,
        Some(JailConfig {
            read_write: vec!["/run/x".into()],
            read_only: vec!["/var/y".into(), "/var/z".into()],
            ..JailConfig::new(1000, 100)
        })
    );
    assert_eq!(cfg.vcpus, 2);
    assert_eq!(cfg.memory_mib, 128);
    assert_eq!(cfg.serial, SerialOutput::File("/tmp/s".into()));
    assert_eq!(cfg.block[0].path.as_deref(), Some(Path::new("/d")));
    assert!(cfg.block[0].read_only);
    assert_eq!(cfg.block[0].serial.as_deref(), Some("layer0"));
    assert_eq!(cfg.block[1].path, None);
    assert_eq!(cfg.net[0].tap.as_deref(), Some("tap0"));
    assert_eq!(cfg.vsock.as_ref().unwrap().guest_cid, 3);
    assert!(cfg.rng);
    assert!(!cfg.seccomp);
}

#[test]
fn rejects_bad_flags() {
    for bad in [
        "",
        "--kernel",
        "--kernel /k --vcpus two",
        "--kernel /k --bogus",
        "--kernel /k --block id=a,colour=red",
        "--kernel /k --serial tty",
        "--kernel /k --vsock cid=3",
        "--kernel /k --jail 1000",
        "--kernel /k --jail a:b",
        "--kernel /k --jail-rw /run/x",
        "--kernel /k --jail-no-landlock",
    ] {
        assert!(VmConfig::from_args(args(bad)).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn parses_json_and_rejects_unknown_fields() {
    let cfg: VmConfig = serde_json::from_str(
        r#"{"kernel":"/k","serial":{"file":"/s"},"block":[{"id":"a","path":"/d"}]}"#,
    )
    .unwrap();
    assert_eq!(cfg.vcpus, 1);
    assert_eq!(cfg.memory_mib, 256);
    assert!(cfg.seccomp);
    assert_eq!(cfg.serial, SerialOutput::File("/s".into()));
    assert!(serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","cpus":2}"#).is_err());
}

fn valid() -> VmConfig {
    VmConfig::from_args(args("--kernel /proc/self/exe")).unwrap()
}

#[test]
fn validation() {
    assert!(valid().validate(1024).is_ok());
    let check = |f: &dyn Fn(&mut VmConfig), want: &str| {
        let mut c = valid();
        f(&mut c);
        let err = c.validate(1024).unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} lacks {want:?}");
    };
    check(&|c| c.kernel = "/nonexistent".into(), "Cannot open kernel");
    check(&|c| c.vcpus = 0, "vcpus");
    check(
        &|c| c.vcpus = MAX_VCPUS + 1,
        &format!("between 1 and {MAX_VCPUS}"),
    );
    check(&|c| c.memory_mib = 1, "at least");
    check(
        &|c| c.log_max_bytes = 100,
        "log_max_bytes must be at least 4096",
    );
    check(&|c| c.memory_mib = 4096, "host");
    let mut huge = valid();
    huge.memory_mib = crate::limits::MAX_MEMORY_MIB + 1;
    let err = huge.check_limits().unwrap_err().to_string();
    assert!(err.contains("at most 1048576"), "{err}");
    let jail = |uid, gid| Some(JailConfig::new(uid, gid));
    check(&|c| c.jail = jail(0, 5), "root");
    check(&|c| c.jail = jail(5, 0), "root");
    check(
        &|c| {
            c.block.push(BlockConfig {
                id: "x".into(),
                path: None,
                read_only: false,
                serial: None,
            });
            c.net.push(NetConfig {
                id: "x".into(),
                tap: Some("t".into()),
                tap_fd: None,
                mac: None,
            });
        },
        "used twice",
    );
    check(
        &|c| {
            c.net.push(NetConfig {
                id: "n".into(),
                tap: None,
                tap_fd: None,
                mac: None,
            })
        },
        "exactly one",
    );
    check(
        &|c| {
            c.net.push(NetConfig {
                id: "n".into(),
                tap: Some("t".into()),
                tap_fd: None,
                mac: Some("zz".into()),
            })
        },
        "MAC",
    );
    check(
        &|c| {
            c.vsock = Some(VsockConfig {
                guest_cid: 2,
                uds_path: "/tmp/v".into(),
            })
        },
        "reserved",
    );
}

#[test]
fn mac() {
    assert_eq!(
        parse_mac("02:0a:FF:00:00:01").unwrap(),
        [2, 10, 255, 0, 0, 1]
    );
    assert!(parse_mac("02:0a:FF:00:00").is_err());
    assert!(parse_mac("02:0a:FF:00:00:001").is_err());
}

#[test]
fn landlock_is_required_unless_the_jail_says_otherwise() {
    let cfg = VmConfig::from_args(args("--kernel /k --jail 1000:100")).unwrap();
    assert!(!cfg.jail.unwrap().allow_no_landlock);
    let cfg = VmConfig::from_args(args("--kernel /k --jail 1000:100 --jail-no-landlock")).unwrap();
    assert!(cfg.jail.unwrap().allow_no_landlock);
    let jail: JailConfig = serde_json::from_str(r#"{"uid":5,"gid":6}"#).unwrap();
    assert_eq!(jail, JailConfig::new(5, 6));
    let jail: JailConfig =
        serde_json::from_str(r#"{"uid":5,"gid":6,"allow_no_landlock":true}"#).unwrap();
    assert!(jail.allow_no_landlock);
}

#[test]
fn a_config_survives_its_own_json() {
    let mut cfg = VmConfig::from_args(args(
        "--kernel /k --initramfs /i --vcpus 4 --block id=b0,path=/l,ro,serial=b0 \
         --block id=b1 --net id=n,tap_fd=5,mac=02:00:00:00:00:01 --vsock cid=3,uds=/v \
         --rng --api-socket /a --jail 7:7 --serial file:/c",
    ))
    .unwrap();
    cfg.jail.as_mut().unwrap().allow_no_landlock = true;
    let json = serde_json::to_value(&cfg).unwrap();
    // Spare slots and empty lists stay out of the file.
    assert!(json["block"][1].get("path").is_none());
    assert!(json["jail"].get("read_write").is_none());
    assert_eq!(json["serial"]["file"], "/c");
    let back: VmConfig = serde_json::from_value(json).unwrap();
    assert_eq!(back, cfg);
}

#[test]
fn too_many_devices_names_the_limit() {
    let mut cfg = valid();
    cfg.rng = true;
    for i in 0..crate::limits::MAX_VIRTIO_DEVICES {
        cfg.block.push(BlockConfig {
            id: format!("b{i}"),
            path: None,
            read_only: false,
            serial: None,
        });
    }
    let err = cfg.check_limits().unwrap_err().to_string();
    assert!(err.contains("at most 19"), "{err}");
    cfg.rng = false;
    cfg.check_limits().unwrap();
}

#[test]
fn long_socket_paths_are_refused() {
    let mut cfg = valid();
    cfg.api_socket = Some(format!("/{}", "a".repeat(crate::limits::MAX_SOCKET_PATH)).into());
    let err = cfg.check_limits().unwrap_err().to_string();
    assert!(err.contains("longer than 100 bytes"), "{err}");
}

#[test]
fn a_shutdown_waits_a_bounded_time() {
    use crate::api::ShutdownRequest;
    use std::time::Duration;
    let wait = |ms| ShutdownRequest { timeout_ms: ms }.timeout();
    assert_eq!(wait(None), Some(ShutdownRequest::DEFAULT_TIMEOUT));
    assert_eq!(wait(Some(300)), Some(Duration::from_millis(300)));
    assert_eq!(wait(Some(60_000)), Some(ShutdownRequest::MAX_TIMEOUT));
    assert_eq!(wait(Some(60_001)), None);
    assert_eq!(wait(Some(u64::MAX)), None);
}
