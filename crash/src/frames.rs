//! Return addresses of the current thread's stack, found from the unwind
//! tables and the loader's list of objects: no system call, so this works
//! under a seccomp filter that forbids opening the executable, which
//! resolving symbols needs.

use std::ffi::{c_int, c_void, CStr};
use std::fmt::Write;

/// How many frames a report lists at most.
const MAX_FRAMES: usize = 64;
/// `_URC_NO_REASON`: go on unwinding.
const URC_NO_REASON: c_int = 0;
/// `_URC_END_OF_STACK`: stop (the list is full).
const URC_END_OF_STACK: c_int = 5;

/// The unwinder's opaque per-frame context.
#[repr(C)]
struct UnwindContext {
    _opaque: [u8; 0],
}

type TraceFn = unsafe extern "C" fn(*mut UnwindContext, *mut c_void) -> c_int;

// The unwinder std itself links (libgcc_s, or libgcc_eh when static).
extern "C" {
    fn _Unwind_Backtrace(trace: TraceFn, arg: *mut c_void) -> c_int;
    fn _Unwind_GetIP(ctx: *mut UnwindContext) -> usize;
}

struct Trace {
    ips: [usize; MAX_FRAMES],
    len: usize,
}

unsafe extern "C" fn record(ctx: *mut UnwindContext, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `Trace` that `return_addresses` passed, and
    // `ctx` the unwinder's live context for this frame.
    let (trace, ip) = unsafe { (&mut *arg.cast::<Trace>(), _Unwind_GetIP(ctx)) };
    if trace.len == MAX_FRAMES {
        return URC_END_OF_STACK;
    }
    trace.ips[trace.len] = ip;
    trace.len += 1;
    URC_NO_REASON
}

/// The return addresses of the calling thread, innermost first.
fn return_addresses() -> Vec<usize> {
    let mut trace = Trace {
        ips: [0; MAX_FRAMES],
        len: 0,
    };
    // SAFETY: `record` matches the unwinder's callback type and only
    // writes into `trace`, which outlives the call.
    unsafe { _Unwind_Backtrace(record, (&mut trace as *mut Trace).cast()) };
    trace.ips[..trace.len].to_vec()
}

/// Where one address lies: the object's file and the address in it.
struct Place {
    ip: usize,
    found: Option<(String, usize)>,
}

unsafe extern "C" fn locate(info: *mut libc::dl_phdr_info, _: usize, arg: *mut c_void) -> c_int {
    // SAFETY: the loader passes a valid `info` for the duration of the
    // call; `arg` is the `Place` that `place_of` passed.
    let (info, place) = unsafe { (&*info, &mut *arg.cast::<Place>()) };
    // SAFETY: `dlpi_phdr` points at `dlpi_phnum` program headers.
    let phdrs = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum.into()) };
    let addr = place.ip.wrapping_sub(info.dlpi_addr as usize) as u64;
    let inside = phdrs
        .iter()
        .any(|p| p.p_type == libc::PT_LOAD && (p.p_vaddr..p.p_vaddr + p.p_memsz).contains(&addr));
    if !inside {
        return 0;
    }
    let name = if info.dlpi_name.is_null() {
        String::new()
    } else {
        // SAFETY: a non-null `dlpi_name` is a NUL-terminated string.
        unsafe { CStr::from_ptr(info.dlpi_name) }
            .to_string_lossy()
            .into_owned()
    };
    place.found = Some((name, addr as usize));
    1
}

/// The object holding `ip` (an empty name: the executable) and the
/// address in its file, which `addr2line -e FILE` takes.
fn place_of(ip: usize) -> Option<(String, usize)> {
    let mut place = Place { ip, found: None };
    // SAFETY: `locate` matches the callback type and only writes `place`,
    // which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(locate), (&mut place as *mut Place).cast()) };
    place.found
}

/// One line per frame of the calling thread: `  0xADDR FILE`, where ADDR
/// is in FILE (`exe`: the executable) and is one byte into the call.
pub fn listing() -> String {
    let mut out = String::new();
    for ip in return_addresses().into_iter().filter(|&ip| ip != 0) {
        // A return address points after the call; step back into it.
        let _ = match place_of(ip.saturating_sub(1)) {
            Some((name, addr)) if name.is_empty() => writeln!(out, "  {addr:#x} exe"),
            Some((name, addr)) => writeln!(out, "  {addr:#x} {name}"),
            None => writeln!(out, "  {ip:#x} ?"),
        };
    }
    out
}
