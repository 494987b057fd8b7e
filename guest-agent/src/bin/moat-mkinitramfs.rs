//! `moat-mkinitramfs AGENT OUT`: writes the guest initramfs (uncompressed
//! newc cpio) with AGENT as /init.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [agent, out] = &args[..] else {
        eprintln!("usage: moat-mkinitramfs AGENT OUT");
        std::process::exit(2);
    };
    let data = std::fs::read(agent).unwrap_or_else(|e| {
        eprintln!("moat-mkinitramfs: reading {agent}: {e}");
        std::process::exit(1)
    });
    if let Some(dir) = std::path::Path::new(out).parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(out, moat_agent::initramfs::guest_initramfs(&data)) {
        eprintln!("moat-mkinitramfs: writing {out}: {e}");
        std::process::exit(1);
    }
}
