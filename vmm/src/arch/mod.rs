//! x86_64 boot: kernel loading, boot protocols, vCPU registers, MP table.

pub mod boot;
pub mod mptable;
pub mod regs;
