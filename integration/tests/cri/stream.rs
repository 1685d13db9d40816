//! The other half of CRI's Exec and Attach: the URL they return is containerd's streaming
//! server, and a client (kubectl, through the kubelet's proxy) speaks the Kubernetes
//! remote-command protocol to it. This is its websocket form, `v4.channel.k8s.io`, on the
//! `tungstenite` client: every binary message starts with a channel byte (0 stdin, 1 stdout,
//! 2 stderr, 3 the final status, 4 terminal resizes), and the status on channel 3 is a
//! Kubernetes `Status` whose causes carry a non-zero exit code.

use std::io::ErrorKind;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::{Message, WebSocket};

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const STATUS: u8 = 3;
const RESIZE: u8 = 4;

/// The subprotocol kubectl asks for first; its status carries the exit code.
const PROTOCOL: &str = "v4.channel.k8s.io";

/// What a stream has delivered so far.
#[derive(Debug, Default, Clone)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The final `Status` (JSON) from the status channel, once sent.
    pub status: Option<serde_json::Value>,
    /// The server closed the stream.
    pub closed: bool,
}

impl Output {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// The exit code the status reports: 0 for `Success`, the `ExitCode` cause of a
    /// `NonZeroExitCode` failure; `None` before a status, or for another failure.
    pub fn exit_code(&self) -> Option<i32> {
        let status = self.status.as_ref()?;
        match status["status"].as_str()? {
            "Success" => Some(0),
            _ if status["reason"] == "NonZeroExitCode" => status["details"]["causes"]
                .as_array()?
                .iter()
                .find(|c| c["reason"] == "ExitCode")?["message"]
                .as_str()?
                .parse()
                .ok(),
            _ => None,
        }
    }
}

/// One exec or attach session on containerd's streaming server.
pub struct Stream {
    ws: WebSocket<TcpStream>,
    url: String,
    output: Output,
}

impl Stream {
    /// Opens the session at `url` (as Exec or Attach returned it, `http://host:port/...`).
    pub fn connect(url: &str) -> Stream {
        let ws_url = url
            .strip_prefix("http://")
            .map(|rest| format!("ws://{rest}"))
            .unwrap_or_else(|| panic!("the streaming URL {url:?} is not plain http"));
        let mut request = ws_url
            .as_str()
            .into_client_request()
            .unwrap_or_else(|e| panic!("streaming URL {url:?}: {e}"));
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(PROTOCOL));
        let host = request
            .uri()
            .authority()
            .unwrap_or_else(|| panic!("the streaming URL {url:?} names no host"))
            .to_string();
        let tcp = TcpStream::connect(&host)
            .unwrap_or_else(|e| panic!("connect to the streaming server at {host}: {e}"));
        tcp.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        let (ws, response) = tungstenite::client(request, tcp)
            .unwrap_or_else(|e| panic!("websocket handshake with {url}: {e}"));
        // Short reads from here on, so that a wait can give up at its deadline.
        ws.get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        assert_eq!(
            response
                .headers()
                .get("Sec-WebSocket-Protocol")
                .and_then(|v| v.to_str().ok()),
            Some(PROTOCOL),
            "the streaming server did not agree to {PROTOCOL}"
        );
        Stream {
            ws,
            url: url.to_owned(),
            output: Output::default(),
        }
    }

    fn send(&mut self, channel: u8, data: &[u8]) {
        let mut message = Vec::with_capacity(data.len() + 1);
        message.push(channel);
        message.extend_from_slice(data);
        self.ws
            .send(Message::Binary(message.into()))
            .unwrap_or_else(|e| panic!("send on channel {channel} of {}: {e}", self.url));
    }

    /// Writes `data` to the process's stdin.
    pub fn stdin(&mut self, data: &[u8]) {
        self.send(STDIN, data);
    }

    /// Tells the terminal its new size, as kubectl does when its window changes.
    pub fn resize(&mut self, width: u16, height: u16) {
        let size = serde_json::json!({ "Width": width, "Height": height });
        self.send(RESIZE, size.to_string().as_bytes());
    }

    /// Reads what has arrived within about 200 ms; false once the stream has ended.
    fn pump(&mut self) -> bool {
        if self.output.closed {
            return false;
        }
        match self.ws.read() {
            Ok(Message::Binary(data)) => {
                if let Some((&channel, rest)) = data.split_first() {
                    match channel {
                        STDOUT => self.output.stdout.extend_from_slice(rest),
                        STDERR => self.output.stderr.extend_from_slice(rest),
                        STATUS if !rest.is_empty() => {
                            let status = serde_json::from_slice(rest).unwrap_or_else(|e| {
                                panic!(
                                    "a status that is not JSON ({e}): {:?}",
                                    String::from_utf8_lossy(rest)
                                )
                            });
                            self.output.status = Some(status);
                        }
                        _ => {}
                    }
                }
                true
            }
            Ok(Message::Close(_)) => {
                self.output.closed = true;
                false
            }
            Ok(_) => true,
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                true
            }
            Err(
                tungstenite::Error::ConnectionClosed
                | tungstenite::Error::AlreadyClosed
                | tungstenite::Error::Io(_)
                | tungstenite::Error::Protocol(_),
            ) => {
                self.output.closed = true;
                false
            }
            Err(e) => panic!("reading the stream of {}: {e}", self.url),
        }
    }

    /// Reads until `want` holds of the output, or `timeout` passes (`None`); the stream
    /// ending first fails the test with what arrived.
    pub fn try_wait_for(
        &mut self,
        timeout: Duration,
        want: impl Fn(&Output) -> bool,
    ) -> Option<Output> {
        let deadline = Instant::now() + timeout;
        while !want(&self.output) {
            assert!(
                self.pump(),
                "the stream of {} ended before it showed what was expected: {:?}",
                self.url,
                self.output
            );
            if Instant::now() >= deadline {
                return None;
            }
        }
        Some(self.output.clone())
    }

    /// What has arrived so far.
    pub fn output(&self) -> &Output {
        &self.output
    }

    /// [`Stream::try_wait_for`] that fails the test at the timeout, with what arrived.
    pub fn wait_for(&mut self, timeout: Duration, want: impl Fn(&Output) -> bool) -> Output {
        self.try_wait_for(timeout, want).unwrap_or_else(|| {
            panic!(
                "the stream of {} did not show what was expected within {timeout:?}: {:?}",
                self.url, self.output
            )
        })
    }

    /// Reads until the server ends the stream (an exec's process exited), within `timeout`.
    pub fn finish(mut self, timeout: Duration) -> Output {
        let deadline = Instant::now() + timeout;
        while self.pump() {
            assert!(
                Instant::now() < deadline,
                "the stream of {} did not end within {timeout:?}: {:?}",
                self.url,
                self.output
            );
        }
        self.output
    }

    /// Ends the session from this side, as kubectl does on ^C or when its stdin ends.
    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.pump() && Instant::now() < deadline {}
    }
}

#[cfg(test)]
mod tests {
    use super::Output;

    #[test]
    fn the_exit_code_is_read_from_a_v4_status() {
        let with = |status: &str| Output {
            status: Some(serde_json::from_str(status).unwrap()),
            ..Default::default()
        };
        assert_eq!(Output::default().exit_code(), None);
        assert_eq!(
            with(r#"{"metadata":{},"status":"Success"}"#).exit_code(),
            Some(0)
        );
        assert_eq!(
            with(
                r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: error executing command [sh], exit code 7","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"7"}]}}"#
            )
            .exit_code(),
            Some(7)
        );
        assert_eq!(
            with(r#"{"metadata":{},"status":"Failure","message":"boom"}"#).exit_code(),
            None
        );
    }
}
