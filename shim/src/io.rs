//! The stdio relay: containerd's stdin/stdout/stderr fifos ↔ the agent's vsock streams.
//!
//! Each process stream is one vsock connection to the agent's stdio port, opened before the
//! process is created (docs/contracts.md), so no output is lost. The fifos are opened
//! read-write, as runc's shim does: opening never blocks on the other end, and containerd
//! closing and reopening its end does not end the relay. Because of that the stdin fifo
//! never reports EOF by itself; the process's stdin ends with containerd's `CloseIO`, which
//! drains what is buffered and half-closes the stream. [`Relay::drained`] returns once every
//! output stream reached EOF, so an exit is reported only after its output is delivered.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::agent::{open_stdio_stream, StdioConfig, StdioStreamError, StreamHeader, StreamKind};

/// Errors of the stdio relay.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// A containerd stdio path cannot be opened
    #[error("Cannot open the stdio path {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A stdio URI scheme husk does not support
    #[error("Unsupported stdio URI {0} (husk relays fifos and files)")]
    Unsupported(String),
    /// A stream to the agent cannot be opened
    #[error("Cannot open the {kind:?} stream to the agent")]
    Stream {
        /// Which stream.
        kind: StreamKind,
        /// The error.
        #[source]
        source: StdioStreamError,
    },
}

/// containerd's stdio of one process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    /// stdin fifo (empty: none).
    pub stdin: String,
    /// stdout fifo or file (empty: none).
    pub stdout: String,
    /// stderr fifo or file (empty: none; unused in terminal mode).
    pub stderr: String,
    /// One pty for all three.
    pub terminal: bool,
}

impl StdioPaths {
    /// The streams the agent should expect.
    pub fn config(&self) -> StdioConfig {
        StdioConfig {
            tty: self.terminal,
            stdin: !self.terminal && !self.stdin.is_empty(),
            stdout: !self.terminal && !self.stdout.is_empty(),
            stderr: !self.terminal && !self.stderr.is_empty(),
            ..Default::default()
        }
    }
}

/// The local path of a stdio URI: a plain path or `file://`; other schemes are refused.
fn local_path(uri: &str) -> Result<PathBuf, IoError> {
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(PathBuf::from(path));
    }
    if uri.contains("://") || !uri.starts_with('/') {
        return Err(IoError::Unsupported(uri.to_owned()));
    }
    Ok(PathBuf::from(uri))
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

fn is_fifo(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

fn open_input(uri: &str) -> Result<pipe::Receiver, IoError> {
    let path = local_path(uri)?;
    pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(&path)
        .map_err(|source| IoError::Open { path, source })
}

async fn open_output(uri: &str) -> Result<Writer, IoError> {
    let path = local_path(uri)?;
    let fail = |source| IoError::Open {
        path: path.clone(),
        source,
    };
    if is_fifo(&path) {
        let sender = pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(&path)
            .map_err(fail)?;
        Ok(Box::new(sender))
    } else {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await
            .map_err(fail)?;
        Ok(Box::new(file))
    }
}

/// A running relay of one process's stdio.
#[derive(Debug)]
pub struct Relay {
    close_stdin: Option<Arc<Notify>>,
    outputs: Vec<JoinHandle<()>>,
    input: Option<JoinHandle<()>>,
}

impl Relay {
    /// Opens the fifos and the agent streams of process (`container_id`, `exec_id`) through
    /// the VMM's hybrid vsock socket `uds`, and starts copying.
    pub async fn attach(
        uds: &Path,
        container_id: &str,
        exec_id: &str,
        paths: &StdioPaths,
    ) -> Result<Self, IoError> {
        let open = |kind| {
            let header = StreamHeader {
                container_id: container_id.to_owned(),
                exec_id: exec_id.to_owned(),
                kind,
            };
            async move {
                open_stdio_stream(uds, &header)
                    .await
                    .map_err(|source| IoError::Stream { kind, source })
            }
        };
        let cfg = paths.config();
        let mut relay = Relay {
            close_stdin: None,
            outputs: Vec::new(),
            input: None,
        };
        if cfg.tty {
            let stdin = (!paths.stdin.is_empty())
                .then(|| open_input(&paths.stdin))
                .transpose()?;
            let stdout = match paths.stdout.is_empty() {
                true => None,
                false => Some(open_output(&paths.stdout).await?),
            };
            let (read, write) = open(StreamKind::Tty).await?.into_split();
            match stdin {
                Some(fifo) => relay.start_input(Box::new(fifo), Box::new(write)),
                None => {
                    // Dropping the write half would be a ^D for the terminal: keep it with
                    // the output.
                    let out = stdout.unwrap_or_else(|| Box::new(tokio::io::sink()));
                    relay.outputs.push(tokio::spawn(async move {
                        let _keep = write;
                        copy_out(Box::new(read), out).await;
                    }));
                    return Ok(relay);
                }
            }
            let out = stdout.unwrap_or_else(|| Box::new(tokio::io::sink()));
            relay
                .outputs
                .push(tokio::spawn(copy_out(Box::new(read), out)));
            return Ok(relay);
        }
        // Open every local end first: a bad path must fail before any stream exists.
        let stdin = cfg.stdin.then(|| open_input(&paths.stdin)).transpose()?;
        let stdout = match cfg.stdout {
            true => Some(open_output(&paths.stdout).await?),
            false => None,
        };
        let stderr = match cfg.stderr {
            true => Some(open_output(&paths.stderr).await?),
            false => None,
        };
        if let Some(fifo) = stdin {
            let stream = open(StreamKind::Stdin).await?;
            relay.start_input(Box::new(fifo), Box::new(stream));
        }
        for (kind, out) in [(StreamKind::Stdout, stdout), (StreamKind::Stderr, stderr)] {
            if let Some(out) = out {
                let stream = open(kind).await?;
                relay
                    .outputs
                    .push(tokio::spawn(copy_out(Box::new(stream), out)));
            }
        }
        Ok(relay)
    }

    fn start_input(&mut self, fifo: Reader, stream: Writer) {
        let close = Arc::new(Notify::new());
        self.close_stdin = Some(close.clone());
        self.input = Some(tokio::spawn(copy_in(fifo, stream, close)));
    }

    /// A handle that ends the process's stdin (once what is buffered in the fifo has been
    /// sent) when notified; `None` without a stdin.
    pub fn stdin_closer(&self) -> Option<Arc<Notify>> {
        self.close_stdin.clone()
    }

    /// Waits until every output stream has reached EOF and been written out.
    pub async fn drained(&mut self) {
        for task in self.outputs.drain(..) {
            let _ = task.await;
        }
    }

    /// Stops every copy (the process is gone or was never created).
    pub fn abort(&mut self) {
        for task in self.outputs.drain(..).chain(self.input.take()) {
            task.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(input) = self.input.take() {
            input.abort();
        }
    }
}

/// Copies an agent output stream into containerd's fifo until EOF.
async fn copy_out(mut from: Reader, mut to: Writer) {
    match tokio::io::copy(&mut from, &mut to).await {
        Ok(bytes) => debug!(bytes, "output stream drained"),
        Err(e) => debug!(error = %e, "output stream ended"),
    }
    let _ = to.flush().await;
}

/// Copies containerd's stdin fifo into the agent stream until `close` is signalled, then
/// sends what is left in the fifo and half-closes the stream.
async fn copy_in(mut from: Reader, mut to: Writer, close: Arc<Notify>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => if to.write_all(&buf[..n]).await.is_err() { return },
            },
            () = close.notified() => {
                // Whatever containerd wrote before CloseIO is already in the fifo.
                while let Ok(Ok(n)) = tokio::time::timeout(
                    std::time::Duration::from_millis(1),
                    from.read(&mut buf),
                ).await {
                    if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                break;
            }
        }
    }
    let _ = to.shutdown().await;
    // Keep the connection until the relay is dropped with its process: closing it fully
    // could be taken for a broken stream while the process still runs.
    std::future::pending::<()>().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdio_config_follows_the_paths() {
        let paths = StdioPaths {
            stdin: String::new(),
            stdout: "/run/x/stdout".into(),
            stderr: "/run/x/stderr".into(),
            terminal: false,
        };
        let c = paths.config();
        assert!(!c.stdin && c.stdout && c.stderr && !c.tty);
        let tty = StdioPaths {
            terminal: true,
            ..paths
        };
        let c = tty.config();
        assert!(c.tty && !c.stdin && !c.stdout && !c.stderr);
    }

    #[test]
    fn only_local_paths_are_relayed() {
        assert_eq!(local_path("/a/b").unwrap(), PathBuf::from("/a/b"));
        assert_eq!(
            local_path("file:///a/log").unwrap(),
            PathBuf::from("/a/log")
        );
        assert!(local_path("binary:///usr/bin/logger").is_err());
        assert!(local_path("relative").is_err());
    }

    #[tokio::test]
    async fn fifo_output_is_relayed() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("out");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut reader = pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(&fifo)
            .unwrap();
        let out = open_output(fifo.to_str().unwrap()).await.unwrap();
        copy_out(Box::new(&b"hello\n"[..]), out).await;
        let mut got = [0u8; 6];
        reader.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello\n");
    }
}
