//! The `containerd-shim-husk-v2` binary's own actions, run as containerd runs them:
//! `-v`, `-info` and `delete` (the cleanup after a dead shim). `start` and serving need a
//! containerd and a VM: integration/tests/containerd.rs covers them.

use std::process::{Command, Stdio};

use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::types::introspection::RuntimeInfo;

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-husk-v2");

#[test]
fn version_names_the_runtime() {
    let out = Command::new(SHIM).arg("-v").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("containerd-shim-husk-v2:\n"), "{text}");
    assert!(text.contains(env!("CARGO_PKG_VERSION")), "{text}");
    assert!(text.contains("io.containerd.husk.v2"), "{text}");
}

#[test]
fn info_prints_runtime_info() {
    let out = Command::new(SHIM)
        .arg("-info")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = RuntimeInfo::parse_from_bytes(&out.stdout).unwrap();
    assert_eq!(info.name, "io.containerd.husk.v2");
    assert_eq!(info.version.version, env!("CARGO_PKG_VERSION"));
}

#[test]
fn unknown_actions_fail() {
    let out = Command::new(SHIM).arg("frobnicate").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unknown action"));
}

/// A dead pod `pod`: its directory under `<tmp>/state`, a bundle holding an empty
/// config.json, and a configuration file naming that state directory.
struct DeadPod {
    _tmp: tempfile::TempDir,
    state: std::path::PathBuf,
    bundle: std::path::PathBuf,
    config: std::path::PathBuf,
}

impl DeadPod {
    fn new(pod: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let bundle = tmp.path().join("bundle");
        std::fs::create_dir_all(state.join(pod).join("mounts").join(pod).join("rootfs")).unwrap();
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::write(bundle.join("config.json"), "{}").unwrap();
        let config = tmp.path().join("husk.toml");
        std::fs::write(
            &config,
            format!("state_dir = {:?}\n", state.display().to_string()),
        )
        .unwrap();
        Self {
            _tmp: tmp,
            state,
            bundle,
            config,
        }
    }

    /// Runs `delete` for `pod` in the bundle, as containerd does, with `HUSK_CONFIG` if given.
    fn delete(&self, pod: &str, husk_config: Option<&std::path::Path>) -> DeleteResponse {
        let mut cmd = Command::new(SHIM);
        cmd.args([
            "-namespace",
            "default",
            "-id",
            pod,
            "-address",
            "/x.sock",
            "delete",
        ])
        .current_dir(&self.bundle)
        .env_remove("HUSK_CONFIG");
        if let Some(config) = husk_config {
            cmd.env("HUSK_CONFIG", config);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        DeleteResponse::parse_from_bytes(&out.stdout).unwrap()
    }
}

#[test]
fn delete_cleans_a_dead_pod_and_reports_it_killed() {
    let pod = DeadPod::new("pod1");
    let resp = pod.delete("pod1", Some(&pod.config));
    assert_eq!(resp.exit_status, 137);
    assert!(resp.exited_at.seconds > 0);
    assert!(
        !pod.state.join("pod1").exists(),
        "the pod directory is left"
    );
    assert!(pod.state.exists(), "the state directory itself must stay");
}

#[test]
fn delete_uses_the_configuration_its_create_noted_in_the_bundle() {
    // containerd runs `delete` without the runtime options that named the configuration
    // (ConfigPath): Create noted the path in the bundle, and delete must follow it to the
    // pod's state directory rather than clean the default one.
    let pod = DeadPod::new("pod2");
    std::fs::write(
        pod.bundle.join(husk_shim::config::CONFIG_PATH_FILE),
        pod.config.display().to_string(),
    )
    .unwrap();
    pod.delete("pod2", None);
    assert!(
        !pod.state.join("pod2").exists(),
        "the noted state directory was not cleaned"
    );
}
