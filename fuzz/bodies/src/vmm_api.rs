//! moat-vmm's control API: its HTTP parser and its routes, on a connection
//! that sends the input, against a VM that only records what it was asked.

use std::io::BufReader;
use std::time::Duration;

use moat_vmm::api::http::{read_request, write_response};
use moat_vmm::api::{handle, ApiError, VmControl};
use moat_vmm::devices::virtio::block::BlockSource;
use moat_vmm_api::{VmInfo, VmState};

/// Most requests served from one input: the server serves a connection's
/// requests until it closes, each one bounded in size.
const MAX_REQUESTS: usize = 64;

/// Serves every request in the input, as one keep-alive connection.
pub fn api(data: &[u8]) {
    let mut reader = BufReader::new(data);
    for _ in 0..MAX_REQUESTS {
        match read_request(&mut reader) {
            Ok(req) => {
                let (status, body) = handle(&FakeVm, &req, Vec::new());
                assert!((200..600).contains(&status), "status {status}");
                let mut out = Vec::new();
                write_response(&mut out, status, &body).expect("a response fits in memory");
                if !req.keep_alive {
                    return;
                }
            }
            // Closed, short or malformed: the server answers or hangs up.
            Err(_) => return,
        }
    }
}

/// A VM whose every operation succeeds, except a block id it does not have.
struct FakeVm;

impl VmControl for FakeVm {
    fn state(&self) -> VmInfo {
        VmInfo {
            state: VmState::Running,
            boot_time_us: Some(1),
        }
    }

    fn pause(&self) -> Result<(), ApiError> {
        Ok(())
    }

    fn resume(&self) -> Result<(), ApiError> {
        Ok(())
    }

    fn shutdown(&self, _timeout: Duration) -> Result<(), ApiError> {
        Ok(())
    }

    fn replace_block(&self, id: &str, _: BlockSource, _: bool) -> Result<(), ApiError> {
        match id {
            "disk0" => Ok(()),
            _ => Err(ApiError::NotFound(format!("No block device {id}"))),
        }
    }
}
