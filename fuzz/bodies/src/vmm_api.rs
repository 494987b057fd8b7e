//! moat-vmm's control API: its HTTP parser and its routes, on a connection
//! that sends the input, against a VM that only records what it was asked.

use std::io::{BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use moat_vmm::api::http::{read_request, write_response};
use moat_vmm::api::{handle, ApiError, VmControl};
use moat_vmm::devices::virtio::block::BlockSource;
use moat_vmm_api::api::VM as VM_PATH;
use moat_vmm_api::{ApiClient, VmInfo, VmState};

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

    fn snapshot(&self, _template: std::fs::File) -> Result<(), ApiError> {
        Ok(())
    }

    fn replace_block(&self, id: &str, _: BlockSource, _: bool) -> Result<(), ApiError> {
        match id {
            "disk0" => Ok(()),
            _ => Err(ApiError::NotFound(format!("No block device {id}"))),
        }
    }
}

/// The shim's side of the API: the client reading a response the VMM (which
/// a guest may have taken over) sends, as its answer to `GET /vm`.
pub fn client(data: &[u8]) {
    let Some(server) = response_server() else {
        return;
    };
    let Ok(server) = server.lock() else { return };
    if server.0.send(data.to_vec()).is_err() {
        return;
    }
    let client = ApiClient::new(&server.1).with_timeout(Duration::from_secs(2));
    if let Ok(response) = client.request("GET", VM_PATH, "", None) {
        let _ = response.into_result::<VmInfo>();
    }
}

/// A unix socket server that answers each connection with the next
/// response it is sent, then hangs up; and its socket path.
type ResponseServer = Mutex<(Sender<Vec<u8>>, PathBuf)>;

/// The directory of the response server's socket, for this process.
fn server_dir() -> PathBuf {
    std::env::temp_dir().join(format!("moat-fuzz-api-{}", std::process::id()))
}

/// Removes [`server_dir`] when the process exits: the server lives as long
/// as the process, and no test run may leave a directory behind.
extern "C" fn remove_server_dir() {
    let _ = std::fs::remove_dir_all(server_dir());
}

fn response_server() -> Option<&'static ResponseServer> {
    static SERVER: OnceLock<Option<ResponseServer>> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            let dir = server_dir();
            std::fs::create_dir_all(&dir).ok()?;
            // SAFETY: registers a plain function with no captured state;
            // exit runs it once, after main returns or `exit` is called.
            unsafe { libc::atexit(remove_server_dir) };
            let path = dir.join("api.sock");
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path).ok()?;
            let (tx, rx) = mpsc::channel::<Vec<u8>>();
            std::thread::spawn(move || {
                for response in rx {
                    let Ok((mut conn, _)) = listener.accept() else {
                        return;
                    };
                    // The request is small and fits the socket buffer.
                    let _ = conn.write_all(&response);
                }
            });
            Some(Mutex::new((tx, path)))
        })
        .as_ref()
}
