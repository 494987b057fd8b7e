//! CRI streaming (Exec, Attach) through containerd's stream server, over
//! WebSocket with Kubernetes' `v4.channel.k8s.io` protocol, as the API
//! server's proxy speaks it to a kubelet: every binary message is one
//! channel byte (0 stdin, 1 stdout, 2 stderr, 3 the final status as a
//! JSON `metav1.Status`, 4 terminal resize) and that channel's data.

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

async fn run_to_end(url: &str, stdin: &[u8]) -> Result<StreamOutput, String> {
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
    if !stdin.is_empty() {
        let frame: Vec<u8> = [STDIN].iter().chain(stdin).copied().collect();
        ws.send(Message::binary(frame))
            .await
            .map_err(|e| format!("send stdin: {e}"))?;
    }
    let mut out = StreamOutput::default();
    let mut status = Vec::new();
    while let Some(msg) = ws.next().await {
        out.trace.push(format!("{msg:?}"));
        match msg {
            Ok(Message::Binary(frame)) => match frame.split_first() {
                Some((&STDOUT, data)) => out.stdout.extend_from_slice(data),
                Some((&STDERR, data)) => out.stderr.extend_from_slice(data),
                Some((&STATUS, data)) => status.extend_from_slice(data),
                _ => {}
            },
            Ok(Message::Close(_)) => break,
            Ok(_) => {}
            // The server may drop the connection instead of closing it.
            Err(_) => break,
        }
    }
    if !status.is_empty() {
        out.status = Some(
            serde_json::from_slice(&status)
                .map_err(|e| format!("status {}: {e}", String::from_utf8_lossy(&status)))?,
        );
    }
    Ok(out)
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
