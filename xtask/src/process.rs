//! Small helpers for running host tools: capture their output, or send it to a log file
//! and show its tail when they fail, so a long build stays quiet until it breaks.

use std::fs::OpenOptions;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// How many lines of a failed command's log are shown.
const FAILURE_TAIL_LINES: usize = 40;

/// Runs `cmd` and returns its stdout; a non-zero exit is an error quoting stderr.
pub fn output_text(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("Cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` with stdout and stderr appended to `log`; on failure the error carries
/// the log's last lines.
pub fn run_logged(cmd: &mut Command, log: &Path) -> Result<()> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("Cannot open {}", log.display()))?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| format!("Cannot run {cmd:?}"))?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(FAILURE_TAIL_LINES)..].join("\n");
        bail!(
            "{cmd:?} failed with {status}; last lines of {}:\n{tail}",
            log.display()
        );
    }
    Ok(())
}
