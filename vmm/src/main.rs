//! `husk-vmm`: parse the command line, set up logging, run one VM, exit with its status
//! (docs/contracts.md: 0 clean, 1 VMM error, 2 usage, 3 guest panic, 4 stopped by signal).

use std::io::IsTerminal;
use std::time::Instant;

use clap::Parser;
use husk_vmm::{CliArgs, ExitStatus};
use tracing_subscriber::EnvFilter;

fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .finish();
    // Not `init()`: that would also route the `log` records of rust-vmm crates (which can be
    // guest-triggered and are not rate limited) into our log.
    let _ = tracing::subscriber::set_global_default(subscriber);
}

fn main() {
    let launched = Instant::now();
    // Before any thread starts (see the function). A failure leaves glibc's default, which
    // still works: the filters then decide.
    if let Err(e) = husk_vmm::seccomp::single_malloc_arena() {
        eprintln!("husk-vmm: {e}");
    }
    let args = match CliArgs::try_parse() {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    init_logging();
    let config = match args.validate() {
        Ok(c) => c,
        Err(e) => {
            let status = if e.is_usage() {
                ExitStatus::Usage
            } else {
                ExitStatus::VmmError
            };
            tracing::error!("{:#}", anyhow::Error::from(e));
            std::process::exit(status.code());
        }
    };
    if let Some(jail) = &config.jail {
        // First, while the process has one thread and no VM: only the child comes back.
        let selftest = config.seccomp_selftest == Some(husk_vmm::seccomp::ThreadKind::Waiter);
        if let Err(e) = husk_vmm::jail::enter_pid_namespace(jail, config.seccomp, selftest) {
            tracing::error!("{:#}", anyhow::Error::from(e));
            std::process::exit(ExitStatus::VmmError.code());
        }
    }
    let status = match husk_vmm::run_vm(&config, launched) {
        Ok(status) => status,
        Err(e) => {
            tracing::error!("{:#}", anyhow::Error::from(e));
            ExitStatus::VmmError
        }
    };
    std::process::exit(status.code());
}
