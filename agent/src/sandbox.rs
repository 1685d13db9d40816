//! The sandbox: what every container of the pod shares (hostname, hosts, resolv.conf and
//! the shared file system holding the containers' rootfs and volumes).
//!
//! The share is the virtio-fs export tagged `husk`, mounted at [`SHARED_DIR`]. Until the VMM
//! has virtio-fs, tests may instead name a directory inside the guest, bind mounted there.

use std::path::{Path, PathBuf};

use husk_agent_api::agent::CreateSandboxRequest;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::safepath;

/// Where the shared file system is mounted in the guest (docs/contracts.md).
pub const SHARED_DIR: &str = "/run/husk/shared";
/// Sandbox-wide files containers may bind mount (`etc/hosts`, `etc/resolv.conf`, `etc/hostname`).
pub const SANDBOX_DIR: &str = "/run/husk/sandbox";
/// Largest hosts or resolv.conf accepted.
const MAX_ETC_FILE_BYTES: usize = 64 * 1024;
/// `HOST_NAME_MAX` (limits.h).
const MAX_HOSTNAME_LEN: usize = 64;
/// The file system type of virtio-fs mounts.
const VIRTIOFS_FSTYPE: &str = "virtiofs";

/// Errors of the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Invalid hostname
    #[error("Invalid hostname {0:?}")]
    Hostname(String),
    /// hosts or resolv.conf is too large
    #[error("{0} is larger than {MAX_ETC_FILE_BYTES} bytes")]
    TooLarge(&'static str),
    /// The share source must be exactly one of a virtio-fs tag or a guest directory
    #[error("The share source must be exactly one of a virtio-fs tag or a guest directory")]
    ShareSource,
    /// Invalid share directory
    #[error("Invalid share directory {0:?}")]
    ShareDir(String),
    /// Cannot mount the shared file system
    #[error("Cannot mount the shared file system from {0:?}")]
    Mount(String, #[source] nix::Error),
    /// Cannot set the hostname
    #[error("Cannot set the hostname")]
    SetHostname(#[source] nix::Error),
    /// Cannot write a sandbox file
    #[error("Cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

fn valid_hostname(name: &str) -> bool {
    name.len() <= MAX_HOSTNAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Checks a request without side effects.
pub fn validate(req: &CreateSandboxRequest) -> Result<(), SandboxError> {
    if !valid_hostname(&req.hostname) {
        return Err(SandboxError::Hostname(req.hostname.clone()));
    }
    if req.hosts.len() > MAX_ETC_FILE_BYTES {
        return Err(SandboxError::TooLarge("hosts"));
    }
    if req.resolv_conf.len() > MAX_ETC_FILE_BYTES {
        return Err(SandboxError::TooLarge("resolv.conf"));
    }
    let share = req.share.as_ref().ok_or(SandboxError::ShareSource)?;
    match (
        share.virtiofs_tag.is_empty(),
        share.guest_directory.is_empty(),
    ) {
        (false, true) => {
            if !share
                .virtiofs_tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                || share.virtiofs_tag.len() > 36
            {
                return Err(SandboxError::ShareSource);
            }
        }
        (true, false) => {
            let dir = Path::new(&share.guest_directory);
            let rel = dir
                .strip_prefix("/")
                .map_err(|_| SandboxError::ShareDir(share.guest_directory.clone()))?;
            safepath::check_plain(rel)
                .map_err(|_| SandboxError::ShareDir(share.guest_directory.clone()))?;
            if !dir.is_dir() || dir.starts_with("/run/husk") {
                return Err(SandboxError::ShareDir(share.guest_directory.clone()));
            }
        }
        _ => return Err(SandboxError::ShareSource),
    }
    Ok(())
}

/// Sets up the sandbox; on failure undoes what it did.
pub fn create(req: &CreateSandboxRequest) -> Result<(), SandboxError> {
    validate(req)?;
    let etc = Path::new(SANDBOX_DIR).join("etc");
    let write = |name: &str, data: &[u8]| {
        let path = etc.join(name);
        std::fs::write(&path, data).map_err(|e| SandboxError::Write(path, e))
    };
    let result = (|| {
        std::fs::create_dir_all(&etc).map_err(|e| SandboxError::Write(etc.clone(), e))?;
        std::fs::create_dir_all(SHARED_DIR)
            .map_err(|e| SandboxError::Write(SHARED_DIR.into(), e))?;
        write("hosts", &req.hosts)?;
        write("resolv.conf", &req.resolv_conf)?;
        write("hostname", format!("{}\n", req.hostname).as_bytes())?;
        if !req.hostname.is_empty() {
            nix::unistd::sethostname(&req.hostname).map_err(SandboxError::SetHostname)?;
        }
        mount_share(req)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(SANDBOX_DIR);
    }
    result
}

fn mount_share(req: &CreateSandboxRequest) -> Result<(), SandboxError> {
    let share = req.share.as_ref().ok_or(SandboxError::ShareSource)?;
    if !share.virtiofs_tag.is_empty() {
        mount(
            Some(share.virtiofs_tag.as_str()),
            SHARED_DIR,
            Some(VIRTIOFS_FSTYPE),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None::<&str>,
        )
        .map_err(|e| SandboxError::Mount(share.virtiofs_tag.clone(), e))
    } else {
        mount(
            Some(share.guest_directory.as_str()),
            SHARED_DIR,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| SandboxError::Mount(share.guest_directory.clone(), e))
    }
}

/// Unmounts the share and removes the sandbox files (best effort: it is the end).
pub fn destroy() {
    let _ = umount2(SHARED_DIR, MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir_all(SANDBOX_DIR);
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_agent_api::agent::ShareSource;

    fn req(tag: &str, dir: &str) -> CreateSandboxRequest {
        CreateSandboxRequest {
            hostname: "pod-1".into(),
            share: Some(ShareSource {
                virtiofs_tag: tag.into(),
                guest_directory: dir.into(),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        }
    }

    #[test]
    fn sandbox_requests_are_validated() {
        validate(&req("husk", "")).unwrap();
        validate(&req("", "/tmp")).unwrap();
        for bad in [
            req("", ""),
            req("husk", "/tmp"),
            req("", "tmp"),
            req("", "/tmp/../etc"),
        ] {
            assert!(validate(&bad).is_err(), "{bad:?}");
        }
        let mut r = req("husk", "");
        r.hostname = "a/b".into();
        assert!(validate(&r).is_err());
        let mut r = req("husk", "");
        r.hosts = vec![b'x'; MAX_ETC_FILE_BYTES + 1];
        assert!(validate(&r).is_err());
    }
}
