//! `cargo xtask boot-check`: the user's smoke test. Builds what is missing, boots the guest
//! with husk-vmm (inside the lab where this host's KVM cannot boot Linux), asks the agent for
//! its version and the guest's details over the hybrid vsock, shuts the VM down cleanly and
//! prints one line: `agent ready: version=<v> kernel=<release> boot_ms=<n>`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use husk_shim::agent::{AgentClient, AGENT_VSOCK_PORT};
use husk_shim::vmm::{Console, VmmCommand};

use crate::lab::{self, KvmMode};
use crate::test::{build_parts, step, Parts};

/// Arguments of `cargo xtask boot-check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Run the check here, assuming a KVM that boots Linux (used inside the lab).
    #[arg(long, hide = true)]
    pub inner: bool,
    /// vCPUs of the guest.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub mem_mib: u32,
}

/// How long the guest may take to announce ready (the lab is slow).
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs the smoke test.
pub fn run(args: &Args) -> Result<()> {
    if args.inner {
        let parts = Parts {
            vmm: env_path("HUSK_VMM")?,
            kernel: env_path("HUSK_KERNEL")?,
            initrd: env_path("HUSK_INITRD")?,
            ..Default::default()
        };
        let line = check(&parts, args)?;
        println!("{line}");
        return Ok(());
    }
    crate::setup::ensure()?;
    let parts = step("build husk-vmm (release) and the guest", build_parts)?;
    let mode = lab::kvm_mode(&parts.vmm, &parts.kernel, &parts.initrd)?;
    match mode {
        KvmMode::Direct => {
            eprintln!("boot-check: booting directly on this host's KVM");
            let line = check(&parts, args)?;
            println!("{line}");
            Ok(())
        }
        KvmMode::Lab => {
            eprintln!("boot-check: this host's /dev/kvm cannot boot Linux; booting in the lab");
            let exe = std::env::current_exe()?.display().to_string();
            let argv = vec![
                exe,
                "boot-check".into(),
                "--inner".into(),
                "--vcpus".into(),
                args.vcpus.to_string(),
                "--mem-mib".into(),
                args.mem_mib.to_string(),
            ];
            let outcome = lab::run(&argv, &parts.env(mode), Duration::from_secs(600))?;
            if outcome.exit_code != 0 {
                bail!(
                    "boot-check failed in the lab (exit status {})",
                    outcome.exit_code
                );
            }
            Ok(())
        }
    }
}

fn env_path(var: &str) -> Result<std::path::PathBuf> {
    std::env::var_os(var)
        .map(Into::into)
        .with_context(|| format!("{var} is not set"))
}

/// Boots, queries and shuts down one guest; returns the summary line.
fn check(parts: &Parts, args: &Args) -> Result<String> {
    let dir = tempfile::Builder::new()
        .prefix("husk-boot-check")
        .tempdir()?;
    let uds = dir.path().join("vsock.sock");
    let console = dir.path().join("console.log");
    let mut child = VmmCommand::new(&parts.vmm, &parts.kernel, &uds)
        .initrd(&parts.initrd)
        .mem_mib(args.mem_mib)
        .vcpus(args.vcpus)
        .console(Console::File(console.clone()))
        .command()
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("Cannot start {}", parts.vmm.display()))?;
    let stderr = child.stderr.take().context("stderr not piped")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut log = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(ms) = line
                .split("guest ready boot_ms=")
                .nth(1)
                .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|d| d.parse::<u64>().ok())
            {
                let _ = tx.send(ms);
            }
            log.push(line);
        }
        log
    });
    let result = (|| -> Result<String> {
        let boot_ms = rx.recv_timeout(READY_TIMEOUT).map_err(|_| {
            anyhow::anyhow!("the guest did not announce ready within {READY_TIMEOUT:?}")
        })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (version, details) = rt.block_on(async {
            let client = AgentClient::connect(&uds, AGENT_VSOCK_PORT, Duration::from_secs(60))
                .await
                .context("The agent did not answer")?;
            let version = client.version().await?;
            let details = client.guest_details().await?;
            client.shutdown().await?;
            anyhow::Ok((version, details))
        })?;
        let status = wait_exit(&mut child, Duration::from_secs(30))?;
        if status != Some(0) {
            bail!("husk-vmm did not exit cleanly after Shutdown: {status:?}");
        }
        Ok(format!(
            "agent ready: version={} kernel={} boot_ms={boot_ms}",
            version.agent_version, details.kernel_release
        ))
    })();
    let _ = child.kill();
    let _ = child.wait();
    let log = reader.join().unwrap_or_default();
    result.map_err(|e| {
        e.context(format!(
            "husk-vmm log:\n{}\nconsole tail:\n{}",
            log.join("\n"),
            tail(&console, 30)
        ))
    })
}

fn wait_exit(child: &mut std::process::Child, within: Duration) -> Result<Option<i32>> {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st.code());
        }
        if std::time::Instant::now() > deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}
