//! Whether AVX (ymm) register state survives context switches: several
//! processes keep their own known values in ymm0-ymm7, yield the CPU to
//! each other in a loop, and compare the registers with memory after every
//! switch. A mismatch means another process's (or the kernel's) vector
//! state leaked into ours: a broken FPU save/restore, as can happen where
//! the guest kernel runs in an emulator.

use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Loads `pattern` into ymm0-ymm7, then `rounds` times: spin, yield
/// (sched_yield), and check every register. Returns whether all held.
#[target_feature(enable = "avx")]
unsafe fn survive(pattern: &[u64; 4], rounds: u64) -> bool {
    let bad: u64;
    // SAFETY: reads 32 bytes at `pattern` (a [u64; 4]); every register it
    // writes is declared as clobbered; the syscall is sched_yield.
    unsafe {
        std::arch::asm!(
            "vmovdqu ymm0, [{p}]",
            "vmovdqu ymm1, [{p}]",
            "vmovdqu ymm2, [{p}]",
            "vmovdqu ymm3, [{p}]",
            "vmovdqu ymm4, [{p}]",
            "vmovdqu ymm5, [{p}]",
            "vmovdqu ymm6, [{p}]",
            "vmovdqu ymm7, [{p}]",
            "2:",
            "mov {c}, 20000",
            "3:",
            "dec {c}",
            "jnz 3b",
            "mov eax, 24",
            "syscall",
            "vxorps ymm8, ymm0, [{p}]", "vptest ymm8, ymm8", "jnz 4f",
            "vxorps ymm8, ymm1, [{p}]", "vptest ymm8, ymm8", "jnz 4f",
            "vxorps ymm8, ymm2, [{p}]", "vptest ymm8, ymm8", "jnz 4f",
            "vxorps ymm8, ymm3, [{p}]", "vptest ymm8, ymm8", "jnz 4f",
            "vxorps ymm8, ymm4, [{p}]", "vptest ymm8, ymm8", "jnz 4f",
            "vxorps ymm8, ymm5, [{p}]", "vptest ymm8, ymm8", "jnz 4f",
            "vxorps ymm8, ymm6, [{p}]", "vptest ymm8, ymm8", "jnz 4f",
            "vxorps ymm8, ymm7, [{p}]", "vptest ymm8, ymm8", "jnz 4f",
            "dec {n}",
            "jnz 2b",
            "xor {bad}, {bad}",
            "jmp 5f",
            "4:",
            "mov {bad}, 1",
            "5:",
            p = in(reg) pattern.as_ptr(),
            n = inout(reg) rounds => _,
            c = out(reg) _,
            bad = out(reg) bad,
            out("rax") _, out("rcx") _, out("r11") _,
            out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
            out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
            out("ymm8") _,
        );
    }
    bad == 0
}

/// One child's loop: (checks, mismatches) until `until`.
fn child_loop(seed: u64, until: Instant) -> (u64, u64) {
    let pattern = [
        seed.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        !seed,
        seed.rotate_left(17) ^ 0x5555_5555_5555_5555,
        seed ^ 0xdead_beef_0bad_f00d,
    ];
    let (mut checks, mut bad) = (0, 0);
    while Instant::now() < until {
        // SAFETY: the caller checked that the CPU has AVX.
        if !unsafe { survive(&pattern, 64) } {
            bad += 1;
        }
        checks += 64;
    }
    (checks, bad)
}

/// Runs `procs` processes for `seconds`; sums their checks and mismatches.
pub fn check(procs: u32, seconds: f64) -> Value {
    if !std::arch::is_x86_feature_detected!("avx") {
        return json!({ "avx": false });
    }
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let mut children = Vec::new();
    for i in 0..procs {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid array of two ints.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            break;
        }
        // SAFETY: the child only computes, writes to its pipe and exits.
        match unsafe { libc::fork() } {
            0 => {
                let (c, b) = child_loop(0x1000 + u64::from(i), until);
                // SAFETY: fds[1] is this process's write end.
                let mut w = unsafe { std::fs::File::from_raw_fd(fds[1]) };
                let _ = write!(w, "{c} {b}");
                // SAFETY: leave without running the parent's atexit work.
                unsafe { libc::_exit(0) };
            }
            pid if pid > 0 => {
                // SAFETY: the parent does not use the write end.
                unsafe { libc::close(fds[1]) };
                // SAFETY: fds[0] is this process's read end.
                children.push((pid, unsafe { std::fs::File::from_raw_fd(fds[0]) }));
            }
            _ => break,
        }
    }
    let (mut checks, mut bad) = (0u64, 0u64);
    let started = children.len();
    for (pid, mut r) in children {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        let mut it = s.split_whitespace().map(|x| x.parse::<u64>().unwrap_or(0));
        checks += it.next().unwrap_or(0);
        bad += it.next().unwrap_or(0);
    }
    json!({ "avx": true, "procs": started, "checks": checks, "mismatches": bad })
}
