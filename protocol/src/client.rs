//! Host-side client: a sync ttrpc [`AgentClient`] that performs the version
//! handshake before anything else and can open stdio streams.

use std::fmt;
use std::io;
use std::ops::Deref;
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::agent::{VersionRequest, VersionResponse};
use crate::agent_ttrpc;
use crate::stream::{ask, Request, StreamError, StreamHeader, StreamKind};
use crate::{MIN_COMPATIBLE_VERSION, PROTOCOL_VERSION, STDIO_PORT_OFFSET};

/// Opens a byte stream to a guest port: hybrid vsock in production
/// ([`Connector::hybrid_vsock`]), a unix socket per port in host tests
/// ([`Connector::unix_ports`]).
#[derive(Clone)]
pub struct Connector(Arc<dyn Fn(u32) -> io::Result<UnixStream> + Send + Sync>);

impl Connector {
    /// A connector that opens guest port `p` by calling `f(p)`.
    pub fn new(f: impl Fn(u32) -> io::Result<UnixStream> + Send + Sync + 'static) -> Connector {
        Connector(Arc::new(f))
    }

    /// Guest ports through the VMM's hybrid vsock socket.
    pub fn hybrid_vsock(uds_path: impl Into<PathBuf>) -> Connector {
        let uds: PathBuf = uds_path.into();
        Connector::new(move |port| crate::vsock::connect_hybrid_vsock(&uds, port))
    }

    /// Port P is the unix socket `<base>_P` (what the agent binds when it is
    /// told to listen on unix sockets instead of vsock).
    pub fn unix_ports(base: impl Into<PathBuf>) -> Connector {
        let base: PathBuf = base.into();
        Connector::new(move |port| UnixStream::connect(unix_port_path(&base, port)))
    }

    /// Opens a new connection to guest port `port`.
    pub fn connect(&self, port: u32) -> io::Result<UnixStream> {
        (self.0)(port)
    }
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Connector")
    }
}

/// The unix socket path that stands for guest port `port` in unix mode.
pub fn unix_port_path(base: &Path, port: u32) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Errors of [`AgentClient`].
#[derive(Debug, Error)]
pub enum ClientError {
    /// The connector could not open the agent or stdio port.
    #[error("cannot connect to the agent: {0}")]
    Connect(#[source] io::Error),
    /// A ttrpc call (the version handshake included) failed.
    #[error("agent call failed: {0}")]
    Ttrpc(#[from] ttrpc::Error),
    /// The agent and this host cannot talk: one's protocol version is below
    /// the other's minimum.
    #[error(
        "incompatible agent: agent speaks protocol {agent} (serves clients >= {agent_min}), \
         this host speaks {ours} (serves agents >= {ours_min}); rebuild the guest initramfs"
    )]
    Incompatible {
        /// The agent's [`PROTOCOL_VERSION`].
        agent: u32,
        /// The oldest client version the agent accepts.
        agent_min: u32,
        /// This host's [`PROTOCOL_VERSION`].
        ours: u32,
        /// The oldest agent version this host accepts ([`MIN_COMPATIBLE_VERSION`]).
        ours_min: u32,
    },
    /// Opening a stdio stream failed in its handshake.
    #[error("stdio stream: {0}")]
    Stream(#[from] StreamError),
    /// [`AgentClient::from_stream`] clients have no connector to open
    /// stdio streams with.
    #[error("this client was built without a connector, so it cannot open stdio streams")]
    NoConnector,
}

/// A connected, version-checked agent client.
///
/// Dereferences to the generated [`agent_ttrpc::AgentClient`], so every call
/// is `client.create_container(client.ctx(), &req)`. The underlying ttrpc
/// client multiplexes: calls may be made concurrently from several threads
/// (blocking calls such as `wait_process` and `get_event` do not hold others up).
pub struct AgentClient {
    inner: agent_ttrpc::AgentClient,
    version: VersionResponse,
    connector: Option<Connector>,
    agent_port: u32,
    timeout: Option<Duration>,
}

impl AgentClient {
    /// Connects to `agent_port` with `connector` and performs the handshake.
    /// Stdio streams are opened on `agent_port + 1`.
    pub fn connect(connector: Connector, agent_port: u32) -> Result<AgentClient, ClientError> {
        let stream = connector
            .connect(agent_port)
            .map_err(ClientError::Connect)?;
        let mut client = AgentClient::from_stream(stream)?;
        client.connector = Some(connector);
        client.agent_port = agent_port;
        Ok(client)
    }

    /// Convenience for [`AgentClient::connect`] over hybrid vsock.
    pub fn connect_hybrid_vsock(
        uds_path: impl Into<PathBuf>,
        agent_port: u32,
    ) -> Result<AgentClient, ClientError> {
        AgentClient::connect(Connector::hybrid_vsock(uds_path), agent_port)
    }

    /// Wraps an already connected stream and performs the handshake. Such a
    /// client cannot open stdio streams ([`ClientError::NoConnector`]).
    pub fn from_stream(stream: UnixStream) -> Result<AgentClient, ClientError> {
        // ttrpc takes ownership of the descriptor and closes it on drop.
        let client = ttrpc::Client::new(stream.into_raw_fd())?;
        let inner = agent_ttrpc::AgentClient::new(client);
        let req = VersionRequest {
            protocol_version: PROTOCOL_VERSION,
            min_agent_version: MIN_COMPATIBLE_VERSION,
            client: format!("moat-protocol {}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        };
        let version =
            inner.version(ttrpc::context::with_duration(Duration::from_secs(30)), &req)?;
        check_compatible(&version)?;
        Ok(AgentClient {
            inner,
            version,
            connector: None,
            agent_port: crate::DEFAULT_AGENT_PORT,
            timeout: None,
        })
    }

    /// The agent's answer to the handshake.
    pub fn agent_version(&self) -> &VersionResponse {
        &self.version
    }

    /// Sets the timeout [`AgentClient::ctx`] applies (None: wait forever).
    pub fn set_default_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// A call context with the default timeout.
    pub fn ctx(&self) -> ttrpc::context::Context {
        match self.timeout {
            Some(t) => ttrpc::context::with_duration(t),
            None => ttrpc::context::Context::default(),
        }
    }

    /// A call context with a specific timeout.
    pub fn ctx_timeout(&self, timeout: Duration) -> ttrpc::context::Context {
        ttrpc::context::with_duration(timeout)
    }

    /// Opens and attaches one stdio stream. Open the streams announced in
    /// `Stdio` before (or while) calling StartContainer / ExecProcess: the
    /// agent starts the process only once all of them are attached.
    pub fn open_stream(
        &self,
        container_id: &str,
        exec_id: &str,
        kind: StreamKind,
    ) -> Result<UnixStream, ClientError> {
        let connector = self.connector.as_ref().ok_or(ClientError::NoConnector)?;
        on_stdio_port(connector, self.agent_port, |s| {
            StreamHeader::new(container_id, exec_id, kind).attach(s)
        })
    }

    /// The connector and agent port, for [`open_forward`] from threads that
    /// do not hold the client.
    pub fn connector(&self) -> Option<(Connector, u32)> {
        Some((self.connector.clone()?, self.agent_port))
    }
}

/// Opens a connection to TCP port `port` on the guest's loopback, through
/// the agent listening on `agent_port` (the CRI PortForward path).
pub fn open_forward(
    connector: &Connector,
    agent_port: u32,
    port: u16,
) -> Result<UnixStream, ClientError> {
    on_stdio_port(connector, agent_port, |s| {
        ask(s, &Request::Forward { port })
    })
}

/// Opens the connection that serves the guest's FUSE mount `tag`
/// (`GUEST_SHARES_DIR/<tag>`) through the agent listening on `agent_port`.
pub fn open_share(
    connector: &Connector,
    agent_port: u32,
    tag: &str,
) -> Result<UnixStream, ClientError> {
    let share = Request::Share { tag: tag.into() };
    on_stdio_port(connector, agent_port, |s| ask(s, &share))
}

/// A new connection to the stdio port, after `handshake` succeeded on it.
fn on_stdio_port(
    connector: &Connector,
    agent_port: u32,
    handshake: impl FnOnce(&mut UnixStream) -> Result<(), StreamError>,
) -> Result<UnixStream, ClientError> {
    let mut stream = connector
        .connect(agent_port + STDIO_PORT_OFFSET)
        .map_err(ClientError::Connect)?;
    // The agent answers at once unless the guest is wedged: a Start
    // must then fail, not hang.
    stream
        .set_read_timeout(Some(crate::STREAM_ATTACH_TIMEOUT))
        .map_err(ClientError::Connect)?;
    handshake(&mut stream)?;
    stream
        .set_read_timeout(None)
        .map_err(ClientError::Connect)?;
    Ok(stream)
}

impl Deref for AgentClient {
    type Target = agent_ttrpc::AgentClient;

    fn deref(&self) -> &agent_ttrpc::AgentClient {
        &self.inner
    }
}

/// Whether the agent that answered `v` can serve this client.
pub fn check_compatible(v: &VersionResponse) -> Result<(), ClientError> {
    if v.protocol_version < MIN_COMPATIBLE_VERSION || PROTOCOL_VERSION < v.min_client_version {
        return Err(ClientError::Incompatible {
            agent: v.protocol_version,
            agent_min: v.min_client_version,
            ours: PROTOCOL_VERSION,
            ours_min: MIN_COMPATIBLE_VERSION,
        });
    }
    Ok(())
}

/// Agent side: whether a client that sent `req` can be served by this agent.
pub fn client_is_compatible(req: &VersionRequest) -> bool {
    req.protocol_version >= MIN_COMPATIBLE_VERSION && req.min_agent_version <= PROTOCOL_VERSION
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(version: u32, min_client: u32) -> VersionResponse {
        VersionResponse {
            protocol_version: version,
            min_client_version: min_client,
            ..Default::default()
        }
    }

    #[test]
    fn same_version_is_compatible() {
        check_compatible(&resp(PROTOCOL_VERSION, MIN_COMPATIBLE_VERSION)).unwrap();
    }

    #[test]
    fn newer_agent_requiring_newer_client_is_refused_clearly() {
        let err = check_compatible(&resp(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 1)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("incompatible agent"), "{msg}");
        assert!(
            msg.contains(&format!("protocol {}", PROTOCOL_VERSION + 1)),
            "{msg}"
        );
    }

    #[test]
    fn too_old_agent_is_refused() {
        assert!(check_compatible(&resp(0, 0)).is_err());
    }

    #[test]
    fn agent_side_check() {
        let ok = VersionRequest {
            protocol_version: PROTOCOL_VERSION,
            min_agent_version: MIN_COMPATIBLE_VERSION,
            ..Default::default()
        };
        assert!(client_is_compatible(&ok));
        let too_new = VersionRequest {
            min_agent_version: PROTOCOL_VERSION + 1,
            ..ok.clone()
        };
        assert!(!client_is_compatible(&too_new));
    }

    #[test]
    fn unix_port_paths() {
        assert_eq!(
            unix_port_path(Path::new("/run/a.sock"), 1025),
            PathBuf::from("/run/a.sock_1025")
        );
    }

    struct FakeAgent {
        version: u32,
        min_client: u32,
    }

    impl agent_ttrpc::Agent for FakeAgent {
        fn version(
            &self,
            _ctx: &ttrpc::TtrpcContext,
            _req: VersionRequest,
        ) -> ttrpc::Result<VersionResponse> {
            Ok(resp(self.version, self.min_client))
        }
    }

    fn serve(agent: FakeAgent, tag: &str) -> (ttrpc::Server, PathBuf) {
        let path =
            std::env::temp_dir().join(format!("moat-proto-{tag}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut server = ttrpc::Server::new()
            .bind(&format!("unix://{}", path.display()))
            .unwrap()
            .register_service(agent_ttrpc::create_agent(Arc::new(agent)));
        server.start().unwrap();
        (server, path)
    }

    #[test]
    fn handshake_over_ttrpc() {
        let (server, path) = serve(
            FakeAgent {
                version: PROTOCOL_VERSION,
                min_client: MIN_COMPATIBLE_VERSION,
            },
            "ok",
        );
        let client = AgentClient::connect(Connector::unix_ports(&path), 0);
        // Port 0 maps to "<path>_0", which does not exist: a connect error.
        assert!(matches!(client, Err(ClientError::Connect(_))));
        let client = AgentClient::from_stream(UnixStream::connect(&path).unwrap()).unwrap();
        assert_eq!(client.agent_version().protocol_version, PROTOCOL_VERSION);
        assert!(matches!(
            client.open_stream("c", "", StreamKind::Stdout),
            Err(ClientError::NoConnector)
        ));
        drop(client);
        server.shutdown();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn handshake_refuses_incompatible_agent() {
        let (server, path) = serve(
            FakeAgent {
                version: PROTOCOL_VERSION + 5,
                min_client: PROTOCOL_VERSION + 5,
            },
            "bad",
        );
        let err = AgentClient::from_stream(UnixStream::connect(&path).unwrap())
            .err()
            .expect("handshake must fail");
        assert!(matches!(err, ClientError::Incompatible { .. }), "{err}");
        server.shutdown();
        let _ = std::fs::remove_file(&path);
    }
}
