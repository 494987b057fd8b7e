//! CRI streaming (Exec, Attach, PortForward) through containerd's stream
//! server, over WebSocket with Kubernetes' `v4.channel.k8s.io` protocol,
//! as the API server's proxy speaks it to a kubelet: every binary message
//! is one channel byte and that channel's data. For Exec and Attach the
//! channels are 0 stdin, 1 stdout, 2 stderr, 3 the final status as a JSON
//! `metav1.Status`, 4 terminal resize. For PortForward each port of the
//! URL's `port` query has a data channel (both ways) and an error channel,
//! and each channel's data begins with the port (2 bytes, little-endian).

use std::collections::HashMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// The subprotocol of Kubernetes' remote command streams.
const PROTOCOL: &str = "v4.channel.k8s.io";
const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const STATUS: u8 = 3;
/// PortForward's channels for its first port.
const DATA: u8 = 0;
const ERROR: u8 = 1;

/// What a finished stream carried.
#[derive(Debug, Default)]
pub struct StreamOutput {
    /// Channel 1.
    pub stdout: Vec<u8>,
    /// Channel 2 (empty with a terminal, which merges it into stdout).
    pub stderr: Vec<u8>,
    /// Channel 3: how the process ended.
    pub status: Option<serde_json::Value>,
    /// Every message received, for a failing test's report.
    pub trace: Vec<String>,
}

impl StreamOutput {
    /// The exit code the status reports: 0 for "Success", else the
    /// `ExitCode` cause of a "NonZeroExitCode" failure.
    pub fn exit_code(&self) -> Option<i32> {
        let status = self.status.as_ref()?;
        if status["status"] == "Success" {
            return Some(0);
        }
        status["details"]["causes"]
            .as_array()?
            .iter()
            .find(|c| c["reason"] == "ExitCode")?["message"]
            .as_str()?
            .parse()
            .ok()
    }

    /// stdout as text.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Connects to `url` (the stream server's answer to Exec or Attach),
/// sends `stdin`, and reads every channel until the server closes the
/// stream or `timeout` passes.
pub async fn run(url: &str, stdin: &[u8], timeout: Duration) -> Result<StreamOutput, String> {
    tokio::time::timeout(timeout, run_to_end(url, stdin))
        .await
        .map_err(|_| format!("the stream of {url} did not end within {timeout:?}"))?
}

/// Connects to `url`, sends `input` on channel `to`, and reads every
/// channel until the server closes the stream: what each channel carried,
/// and a trace of the messages.
async fn exchange(
    url: &str,
    to: u8,
    input: &[u8],
) -> Result<(HashMap<u8, Vec<u8>>, Vec<String>), String> {
    let ws_url = url.replacen("http://", "ws://", 1);
    let mut request = ws_url
        .into_client_request()
        .map_err(|e| format!("{url}: {e}"))?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(PROTOCOL));
    let (mut ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|e| format!("connect {url}: {e}"))?;
    if !input.is_empty() {
        let frame: Vec<u8> = [to].iter().chain(input).copied().collect();
        ws.send(Message::binary(frame))
            .await
            .map_err(|e| format!("send on channel {to}: {e}"))?;
    }
    let mut channels: HashMap<u8, Vec<u8>> = HashMap::new();
    let mut trace = Vec::new();
    while let Some(msg) = ws.next().await {
        trace.push(format!("{msg:?}"));
        match msg {
            Ok(Message::Binary(frame)) => {
                if let Some((&channel, data)) = frame.split_first() {
                    channels.entry(channel).or_default().extend_from_slice(data);
                }
            }
            Ok(Message::Close(_)) => break,
            Ok(_) => {}
            // The server may drop the connection instead of closing it.
            Err(_) => break,
        }
    }
    Ok((channels, trace))
}

async fn run_to_end(url: &str, stdin: &[u8]) -> Result<StreamOutput, String> {
    let (mut channels, trace) = exchange(url, STDIN, stdin).await?;
    let mut out = StreamOutput {
        stdout: channels.remove(&STDOUT).unwrap_or_default(),
        stderr: channels.remove(&STDERR).unwrap_or_default(),
        status: None,
        trace,
    };
    let status = channels.remove(&STATUS).unwrap_or_default();
    if !status.is_empty() {
        out.status = Some(
            serde_json::from_slice(&status)
                .map_err(|e| format!("status {}: {e}", String::from_utf8_lossy(&status)))?,
        );
    }
    Ok(out)
}

/// What a port forward's stream carried.
#[derive(Debug, Default)]
pub struct ForwardOutput {
    /// The data channel, after its port prefix: what the port answered.
    pub data: Vec<u8>,
    /// The error channel, after its port prefix.
    pub error: String,
    /// Every message received, for a failing test's report.
    pub trace: Vec<String>,
}

/// Connects to `url` (the stream server's answer to PortForward) for
/// `port`, sends `request` to the port, and reads its answer until the
/// server closes the stream or `timeout` passes.
pub async fn forward(
    url: &str,
    port: u16,
    request: &[u8],
    timeout: Duration,
) -> Result<ForwardOutput, String> {
    let url = format!("{url}?port={port}");
    let (mut channels, trace) = tokio::time::timeout(timeout, exchange(&url, DATA, request))
        .await
        .map_err(|_| format!("the stream of {url} did not end within {timeout:?}"))??;
    let mut after_port = |channel| -> Result<Vec<u8>, String> {
        let bytes = channels.remove(&channel).unwrap_or_default();
        match bytes.get(..2) {
            Some(p) if p == port.to_le_bytes() => Ok(bytes[2..].to_vec()),
            _ => Err(format!(
                "channel {channel} does not begin with port {port}: {trace:?}"
            )),
        }
    };
    Ok(ForwardOutput {
        data: after_port(DATA)?,
        error: String::from_utf8_lossy(&after_port(ERROR)?).into_owned(),
        trace,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn exit_codes_from_statuses() {
        let with = |status| StreamOutput {
            status: Some(status),
            ..Default::default()
        };
        assert_eq!(with(json!({"status": "Success"})).exit_code(), Some(0));
        let failed = json!({"status": "Failure", "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": "5"}]}});
        assert_eq!(with(failed).exit_code(), Some(5));
        assert_eq!(StreamOutput::default().exit_code(), None);
    }
}
