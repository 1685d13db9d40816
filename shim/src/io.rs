//! The stdio relay: containerd's stdin/stdout/stderr fifos ↔ the agent's vsock streams.
//!
//! Each process stream is one vsock connection to the agent's stdio port, opened before the
//! process is created (docs/contracts.md), so no output is lost. The fifos are opened
//! read-write, as runc's shim does: opening never blocks on the other end, and containerd
//! closing and reopening its end does not end the relay. Because of that the stdin fifo
//! never reports EOF by itself; the process's stdin ends with containerd's `CloseIO`, which
//! drains what is buffered and half-closes the stream. [`Relay::drained`] returns once every
//! output stream reached EOF, so an exit is reported only after its output is delivered; a
//! guest that keeps a stream open after the exit without sending anything is given up on
//! after an idle limit, so it cannot hold the exit back forever.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

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
    /// Bytes the output copies have delivered (what [`Relay::drained`] watches move).
    progress: Arc<AtomicU64>,
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
        let mut relay = Relay {
            close_stdin: None,
            outputs: Vec::new(),
            input: None,
            progress: Arc::default(),
        };
        match relay.start(paths, open).await {
            Ok(()) => Ok(relay),
            Err(e) => {
                // No copy of a half-opened relay outlives it.
                relay.abort();
                Err(e)
            }
        }
    }

    async fn start<F, Fut>(&mut self, paths: &StdioPaths, open: F) -> Result<(), IoError>
    where
        F: Fn(StreamKind) -> Fut,
        Fut: std::future::Future<Output = Result<tokio::net::UnixStream, IoError>>,
    {
        let cfg = paths.config();
        if cfg.tty {
            let stdin = (!paths.stdin.is_empty())
                .then(|| open_input(&paths.stdin))
                .transpose()?;
            let stdout = match paths.stdout.is_empty() {
                true => None,
                false => Some(open_output(&paths.stdout).await?),
            };
            let (read, write) = open(StreamKind::Tty).await?.into_split();
            let out = stdout.unwrap_or_else(|| Box::new(tokio::io::sink()));
            match stdin {
                Some(fifo) => self.start_input(Box::new(fifo), Box::new(write)),
                None => {
                    // Dropping the write half would be a ^D for the terminal: keep it with
                    // the output.
                    let progress = self.progress.clone();
                    self.outputs.push(tokio::spawn(async move {
                        let _keep = write;
                        copy_out(Box::new(read), out, progress).await;
                    }));
                    return Ok(());
                }
            }
            let progress = self.progress.clone();
            self.outputs
                .push(tokio::spawn(copy_out(Box::new(read), out, progress)));
            return Ok(());
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
            self.start_input(Box::new(fifo), Box::new(stream));
        }
        for (kind, out) in [(StreamKind::Stdout, stdout), (StreamKind::Stderr, stderr)] {
            if let Some(out) = out {
                let stream = open(kind).await?;
                let progress = self.progress.clone();
                self.outputs
                    .push(tokio::spawn(copy_out(Box::new(stream), out, progress)));
            }
        }
        Ok(())
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

    /// Waits until every output stream has reached EOF and been written out, or until no
    /// byte has moved for `idle` (a guest that keeps a stream open after its process
    /// exited); then the copies are stopped. Returns whether the output was drained.
    pub async fn drained(&mut self, idle: Duration) -> bool {
        let mut outputs = std::mem::take(&mut self.outputs);
        let mut all = Box::pin(async {
            for task in outputs.iter_mut() {
                let _ = task.await;
            }
        });
        let mut seen = self.progress.load(Ordering::Relaxed);
        let drained = loop {
            if tokio::time::timeout(idle, &mut all).await.is_ok() {
                break true;
            }
            let now = self.progress.load(Ordering::Relaxed);
            if now == seen {
                break false;
            }
            seen = now;
        };
        drop(all);
        if !drained {
            warn!(
                idle = ?idle,
                "an output stream stayed open and idle after the process exited; stopped"
            );
            for task in outputs {
                task.abort();
            }
        }
        drained
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

/// Copies an agent output stream into containerd's fifo until EOF, counting the bytes
/// delivered in `progress`.
async fn copy_out(mut from: Reader, mut to: Writer, progress: Arc<AtomicU64>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    let end = loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) => break Err(e),
        };
        if let Err(e) = to.write_all(&buf[..n]).await {
            break Err(e);
        }
        total += n as u64;
        progress.fetch_add(n as u64, Ordering::Relaxed);
    };
    match end {
        Ok(()) => debug!(bytes = total, "output stream drained"),
        Err(e) => debug!(bytes = total, error = %e, "output stream ended"),
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
        copy_out(Box::new(&b"hello\n"[..]), out, Arc::default()).await;
        let mut got = [0u8; 6];
        reader.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello\n");
    }
}

/// The relay against a scripted guest: a hybrid vsock socket that does the handshake and
/// then answers each stream's header as the test says.
#[cfg(test)]
mod guest_tests {
    use std::time::Instant;

    use tokio::net::{UnixListener, UnixStream};
    use tokio::sync::mpsc;

    use super::*;
    use crate::agent::open_stdio_stream_within;

    /// Serves `uds`: connection `i` gets `acks[i]` (`None`: never answered) and, when
    /// accepted, is handed to the test.
    fn scripted_guest(uds: &Path, acks: Vec<Option<u8>>) -> mpsc::UnboundedReceiver<UnixStream> {
        let listener = UnixListener::bind(uds).unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut held = Vec::new();
            for ack in acks {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let mut byte = [0u8; 1];
                while conn.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {}
                conn.write_all(b"OK 1073741824\n").await.unwrap();
                let mut header = [0u8; 256];
                let _ = conn.read(&mut header).await.unwrap();
                match ack {
                    Some(answer) => {
                        conn.write_all(&[answer]).await.unwrap();
                        if answer == 0 {
                            let _ = tx.send(conn);
                        }
                    }
                    None => held.push(conn),
                }
            }
            std::future::pending::<()>().await;
        });
        rx
    }

    fn paths(dir: &Path, stderr: bool) -> StdioPaths {
        let file = |name: &str| dir.join(name).to_str().unwrap().to_owned();
        StdioPaths {
            stdin: String::new(),
            stdout: file("stdout"),
            stderr: if stderr {
                file("stderr")
            } else {
                String::new()
            },
            terminal: false,
        }
    }

    /// S6: a guest that takes the connection but never accepts the stream fails the open
    /// in bounded time.
    #[tokio::test]
    async fn an_unanswered_stream_fails_in_bounded_time() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let _guest = scripted_guest(&uds, vec![None]);
        let header = StreamHeader {
            container_id: "c1".into(),
            exec_id: String::new(),
            kind: StreamKind::Stdout,
        };
        let started = Instant::now();
        let limit = Duration::from_millis(300);
        let open = open_stdio_stream_within(&uds, &header, limit);
        let err = tokio::time::timeout(Duration::from_secs(5), open)
            .await
            .expect("the open is not bounded")
            .unwrap_err();
        assert!(
            matches!(err, StdioStreamError::Timeout(l) if l == limit),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// S9: when one stream of a process cannot be opened, the copies already started end
    /// with the failed attach (the guest's end of the open stream sees it closed).
    #[tokio::test]
    async fn a_half_opened_relay_leaves_no_copy_behind() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let mut accepted = scripted_guest(&uds, vec![Some(0), Some(1)]);
        let err = Relay::attach(&uds, "c1", "", &paths(dir.path(), true))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                IoError::Stream {
                    kind: StreamKind::Stderr,
                    source: StdioStreamError::Refused(1)
                }
            ),
            "{err:?}"
        );
        let mut stdout = accepted.recv().await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), stdout.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0))),
            "the stdout copy is still running: {read:?}"
        );
    }

    /// S6: after an exit, a stream the guest keeps open and silent is given up on; one that
    /// is slow but moving is waited for to the end.
    #[tokio::test]
    async fn draining_gives_up_on_an_idle_stream_but_not_on_a_slow_one() {
        let idle = Duration::from_millis(300);
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let mut accepted = scripted_guest(&uds, vec![Some(0), Some(0)]);

        let mut silent = Relay::attach(&uds, "c1", "", &paths(dir.path(), false))
            .await
            .unwrap();
        let _guest_end = accepted.recv().await.unwrap();
        let started = Instant::now();
        let drained = tokio::time::timeout(Duration::from_secs(5), silent.drained(idle)).await;
        assert_eq!(drained, Ok(false), "an idle open stream was waited for");
        assert!(started.elapsed() < Duration::from_secs(5));

        let mut slow = Relay::attach(&uds, "c2", "", &paths(dir.path(), false))
            .await
            .unwrap();
        let mut guest_end = accepted.recv().await.unwrap();
        tokio::spawn(async move {
            for _ in 0..10 {
                guest_end.write_all(b"x").await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        assert!(slow.drained(idle).await, "a slow stream was cut");
        let out = std::fs::read(dir.path().join("stdout")).unwrap();
        assert_eq!(out, b"xxxxxxxxxx");
    }
}
