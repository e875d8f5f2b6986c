//! The CLI's client of the agent: HTTP/1.1 over the Unix socket with
//! hyper's connection API, one connection per command.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

use super::api::ErrorBody;

/// Largest answer accepted (volume listings on a busy host included).
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Why the agent could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket (absent, or stale): act directly.
    #[error("no agent listens on {0}")]
    NotRunning(String),
    /// The connection or the exchange failed after the agent answered.
    #[error("talking to the agent on {path}: {what}")]
    Exchange {
        /// The socket.
        path: String,
        /// What went wrong.
        what: String,
    },
    /// No answer within the time allowed.
    #[error("the agent on {0} did not answer in time")]
    TimedOut(String),
}

/// An error the agent answered with; the CLI maps its code to an exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RemoteError {
    /// HTTP status.
    pub status: u16,
    /// Stable code.
    pub code: String,
    /// Message.
    pub message: String,
}

/// Sends one request and returns the status and body.
pub async fn request(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), ClientError> {
    let shown = socket.display().to_string();
    let stream = match tokio::net::UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ClientError::NotRunning(shown));
        }
        Err(e) => {
            return Err(ClientError::Exchange {
                path: shown,
                what: e.to_string(),
            });
        }
    };
    let exchange = async {
        let fail = |what: String| ClientError::Exchange {
            path: shown.clone(),
            what,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let driver = tokio::spawn(conn);
        let has_body = body.is_some();
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "luks-agent");
        if has_body {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| fail(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| fail(e.to_string()))?
            .to_bytes();
        driver.abort();
        Ok((status, bytes))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ClientError::TimedOut(socket.display().to_string()))?
}

/// The answer as `T`, or the agent's error.
pub fn decode<T: serde::de::DeserializeOwned>(
    status: StatusCode,
    body: &[u8],
) -> Result<T, RemoteError> {
    if status.is_success() {
        return serde_json::from_slice(body).map_err(|e| RemoteError {
            status: status.as_u16(),
            code: "internal".into(),
            message: format!("the agent's answer does not parse: {e}"),
        });
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => Err(RemoteError {
            status: status.as_u16(),
            code: e.error.code,
            message: e.error.message,
        }),
        Err(_) => Err(RemoteError {
            status: status.as_u16(),
            code: "internal".into(),
            message: format!(
                "the agent answered HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(512)])
            ),
        }),
    }
}
