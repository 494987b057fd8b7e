//! Legacy PC devices on port I/O: the 8250 console, the i8042 controller
//! (reset line and Ctrl-Alt-Del) and the boot-timer port.

pub mod boot_timer;
pub mod i8042;
pub mod serial;

pub use boot_timer::BootTimer;
pub use i8042::I8042;
pub use serial::{EventFdTrigger, SerialDevice, SerialState};
