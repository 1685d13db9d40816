//! Kubernetes' view of a runtime: a CRI v1 client (gRPC, the `k8s-cri` bindings on tonic) to the
//! CRI plugin of a private containerd (`Containerd::start_cri`), making the calls a kubelet
//! makes, with the pod's runtime handler chosen by `$HUSK_TEST_RUNTIME` (`husk`, or `runc` to
//! prove the harness).
//!
//! The calls block (each runs on the fixture's own tokio runtime), so the tests read like the
//! `ctr` ones. A call that fails panics with the method, the gRPC status and the tail of
//! containerd's log, except where a test wants the [`tonic::Status`] itself ([`Cri::try_call`]).
//! On drop every pod still there is stopped and removed, as a kubelet would, before the
//! containerd fixture stops.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    AttachRequest, ContainerConfig, ContainerMetadata, ContainerState, ContainerStatus,
    ContainerStatusRequest, CreateContainerRequest, DnsConfig, ExecRequest, ExecSyncRequest,
    ExecSyncResponse, ImageSpec, KeyValue, LinuxPodSandboxConfig, ListPodSandboxRequest, Mount,
    NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PodSandboxStats,
    PodSandboxStatsRequest, PodSandboxStatus, PodSandboxStatusRequest, RemoveContainerRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StatusRequest,
    StopPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

use husk_integration::containerd::{Containerd, Runtime, IMAGE};

use crate::stream::Stream;

/// How long the CRI plugin may take to say its runtime and network are ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Limit for one CRI call (RunPodSandbox boots a VM in the slow lab).
const CALL_TIMEOUT: Duration = Duration::from_secs(240);

/// A CRI client on a CRI-enabled containerd fixture.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
    runtime: Runtime,
    pod_logs: PathBuf,
    /// Dropped after the pods are gone (fields drop after `Drop::drop`).
    containerd: Containerd,
}

impl std::fmt::Debug for Cri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cri")
            .field("runtime", &self.runtime)
            .field("containerd", &self.containerd)
            .finish()
    }
}

impl Cri {
    /// Starts containerd with its CRI plugin for the runtime in `$HUSK_TEST_RUNTIME` and waits
    /// until the plugin reports its runtime and network ready.
    pub fn start() -> Cri {
        let runtime = Runtime::from_env();
        let containerd = Containerd::start_cri(runtime);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let socket = containerd.address().to_owned();
        let channel = rt
            .block_on(async move {
                Endpoint::try_from("http://[::]")?
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let socket = socket.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(socket).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(stream))
                        }
                    }))
                    .await
            })
            .expect("connect to containerd's CRI socket");
        let pod_logs = containerd.dir().join("pod-logs");
        std::fs::create_dir_all(&pod_logs).expect("pod log directory");
        let cri = Cri {
            rt,
            client: RuntimeServiceClient::new(channel),
            runtime,
            pod_logs,
            containerd,
        };
        cri.wait_ready();
        cri
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let status = self.try_call("Status", |mut c| async move {
                c.status(StatusRequest { verbose: false }).await
            });
            let conditions = status
                .as_ref()
                .ok()
                .and_then(|s| s.status.as_ref())
                .map(|s| s.conditions.clone())
                .unwrap_or_default();
            let ready = |t: &str| conditions.iter().any(|c| c.r#type == t && c.status);
            if ready("RuntimeReady") && ready("NetworkReady") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the CRI plugin was not ready within {READY_TIMEOUT:?}: {status:?}\n{}",
                self.containerd.log_tail()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The containerd fixture under the CRI plugin.
    pub fn containerd(&self) -> &Containerd {
        &self.containerd
    }

    /// The runtime under test.
    pub fn runtime(&self) -> Runtime {
        self.runtime
    }

    /// Makes `runtime` the one under test for the calls that follow (the husk fixture
    /// configures both handlers; `cargo xtask bench cri` alternates them).
    #[allow(dead_code)]
    pub fn set_runtime(&mut self, runtime: Runtime) {
        self.runtime = runtime;
    }

    /// The CRI runtime handler of the runtime under test (a RuntimeClass's `handler`).
    pub fn handler(&self) -> &'static str {
        match self.runtime {
            Runtime::Husk => "husk",
            Runtime::Runc => "runc",
        }
    }

    /// Runs one call of the runtime service and returns its reply or its status.
    pub fn try_call<T, F, Fut>(&self, method: &str, call: F) -> Result<T, tonic::Status>
    where
        F: FnOnce(RuntimeServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.client.clone();
        self.rt.block_on(async {
            match tokio::time::timeout(CALL_TIMEOUT, call(client)).await {
                Ok(reply) => reply.map(tonic::Response::into_inner),
                Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                    "{method}: no answer within {CALL_TIMEOUT:?}"
                ))),
            }
        })
    }

    /// [`Cri::try_call`] that fails the test on an error status.
    pub fn call<T, F, Fut>(&self, method: &str, call: F) -> T
    where
        F: FnOnce(RuntimeServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.try_call(method, call)
            .unwrap_or_else(|status| self.failed(method, status))
    }

    /// Panics with a failed call's method, its status and containerd's log tail.
    fn failed(&self, method: &str, status: tonic::Status) -> ! {
        panic!(
            "CRI {method} failed: {:?}: {}\n--- containerd log ---\n{}",
            status.code(),
            status.message(),
            self.containerd.log_tail()
        )
    }

    /// A pod's config as a kubelet writes it: metadata, hostname, its log directory.
    pub fn pod_config(&self, name: &str) -> PodSandboxConfig {
        let uid = format!("uid-{name}");
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: uid.clone(),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: self
                .pod_logs
                .join(format!("default_{name}_{uid}"))
                .display()
                .to_string(),
            dns_config: None,
            linux: Some(LinuxPodSandboxConfig::default()),
            ..Default::default()
        }
    }

    /// RunPodSandbox with the runtime under test's handler; returns the pod's id.
    pub fn run_pod(&self, config: &PodSandboxConfig) -> String {
        self.try_run_pod(config)
            .unwrap_or_else(|status| self.failed("RunPodSandbox", status))
    }

    /// RunPodSandbox, returning its error status.
    pub fn try_run_pod(&self, config: &PodSandboxConfig) -> Result<String, tonic::Status> {
        let request = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: self.handler().into(),
        };
        self.try_call("RunPodSandbox", |mut c| async move {
            c.run_pod_sandbox(request).await
        })
        .map(|r| r.pod_sandbox_id)
    }

    /// A container of the test image running `argv` (as the image's command), its CRI log file
    /// `<name>_<attempt>.log` in the pod's log directory.
    pub fn container_config(&self, name: &str, attempt: u32, argv: &[&str]) -> ContainerConfig {
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt,
            }),
            image: Some(ImageSpec {
                image: IMAGE.into(),
                ..Default::default()
            }),
            command: argv.iter().map(|a| a.to_string()).collect(),
            log_path: format!("{name}/{attempt}.log"),
            envs: vec![KeyValue {
                key: "HUSK_CRI_TEST".into(),
                value: "1".into(),
            }],
            ..Default::default()
        }
    }

    /// A read-write or read-only host path volume at `container_path`.
    pub fn host_path(host: &Path, container_path: &str, readonly: bool) -> Mount {
        Mount {
            container_path: container_path.into(),
            host_path: host.display().to_string(),
            readonly,
            ..Default::default()
        }
    }

    /// CreateContainer then StartContainer; returns the container's id.
    pub fn start_container(
        &self,
        pod_id: &str,
        pod: &PodSandboxConfig,
        config: ContainerConfig,
    ) -> String {
        let id = self.create_container(pod_id, pod, config);
        if let Err(status) = self.try_start_container(&id) {
            self.failed("StartContainer", status)
        }
        id
    }

    /// CreateContainer; returns the container's id.
    pub fn create_container(
        &self,
        pod_id: &str,
        pod: &PodSandboxConfig,
        config: ContainerConfig,
    ) -> String {
        let request = CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(config),
            sandbox_config: Some(pod.clone()),
        };
        self.call("CreateContainer", |mut c| async move {
            c.create_container(request).await
        })
        .container_id
    }

    /// StartContainer, returning its error status.
    pub fn try_start_container(&self, id: &str) -> Result<(), tonic::Status> {
        let start = StartContainerRequest {
            container_id: id.into(),
        };
        self.try_call("StartContainer", |mut c| async move {
            c.start_container(start).await
        })
        .map(drop)
    }

    /// ExecSync of `cmd` in the container (timeout in seconds, 0 for none).
    pub fn exec_sync(&self, id: &str, cmd: &[&str], timeout_secs: i64) -> ExecSyncResponse {
        let request = ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|a| a.to_string()).collect(),
            timeout: timeout_secs,
        };
        self.call(
            "ExecSync",
            |mut c| async move { c.exec_sync(request).await },
        )
    }

    /// Exec (streaming) of `cmd` in the container, its session opened on containerd's
    /// streaming server: stdout always; stdin if asked; stderr apart unless on a terminal
    /// (CRI refuses both).
    pub fn exec(&self, id: &str, cmd: &[&str], stdin: bool, tty: bool) -> Stream {
        let request = ExecRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|a| a.to_string()).collect(),
            tty,
            stdin,
            stdout: true,
            stderr: !tty,
        };
        let url = self
            .call("Exec", |mut c| async move { c.exec(request).await })
            .url;
        Stream::connect(&url)
    }

    /// Attach (streaming) to the container's own stdio, as `kubectl attach` does.
    pub fn attach(&self, id: &str, stdin: bool, tty: bool) -> Stream {
        let request = AttachRequest {
            container_id: id.into(),
            stdin,
            tty,
            stdout: true,
            stderr: !tty,
        };
        let url = self
            .call("Attach", |mut c| async move { c.attach(request).await })
            .url;
        Stream::connect(&url)
    }

    /// ExecSync that must exit 0 with nothing on stderr; returns its stdout.
    pub fn exec_ok(&self, id: &str, cmd: &[&str]) -> String {
        let r = self.exec_sync(id, cmd, 60);
        assert_eq!(
            (r.exit_code, String::from_utf8_lossy(&r.stderr).as_ref()),
            (0, ""),
            "ExecSync {cmd:?} in {id}: stdout {:?}",
            String::from_utf8_lossy(&r.stdout)
        );
        String::from_utf8_lossy(&r.stdout).into_owned()
    }

    /// ContainerStatus.
    pub fn container_status(&self, id: &str) -> ContainerStatus {
        let request = ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        self.call("ContainerStatus", |mut c| async move {
            c.container_status(request).await
        })
        .status
        .expect("ContainerStatus without a status")
    }

    /// Polls ContainerStatus until the container has exited; returns that status.
    pub fn wait_exited(&self, id: &str, timeout: Duration) -> ContainerStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.container_status(id);
            if status.state == ContainerState::ContainerExited as i32 {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "container {id} did not exit within {timeout:?}: {status:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// RemoveContainer.
    pub fn remove_container(&self, id: &str) {
        let request = RemoveContainerRequest {
            container_id: id.into(),
        };
        self.call("RemoveContainer", |mut c| async move {
            c.remove_container(request).await
        });
    }

    /// PodSandboxStats.
    pub fn pod_stats(&self, pod_id: &str) -> PodSandboxStats {
        let request = PodSandboxStatsRequest {
            pod_sandbox_id: pod_id.into(),
        };
        self.call("PodSandboxStats", |mut c| async move {
            c.pod_sandbox_stats(request).await
        })
        .stats
        .expect("PodSandboxStats without stats")
    }

    /// PodSandboxStatus.
    pub fn pod_status(&self, pod_id: &str) -> PodSandboxStatus {
        let request = PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.into(),
            verbose: false,
        };
        self.call("PodSandboxStatus", |mut c| async move {
            c.pod_sandbox_status(request).await
        })
        .status
        .expect("PodSandboxStatus without a status")
    }

    /// StopPodSandbox then RemovePodSandbox.
    pub fn remove_pod(&self, pod_id: &str) {
        if let Err((method, status)) = self.try_remove_pod(pod_id) {
            self.failed(method, status);
        }
    }

    /// StopPodSandbox then RemovePodSandbox; the first call that fails, with its status.
    fn try_remove_pod(&self, pod_id: &str) -> Result<(), (&'static str, tonic::Status)> {
        let id = pod_id.to_string();
        self.try_call("StopPodSandbox", |mut c| async move {
            c.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: id })
                .await
        })
        .map_err(|s| ("StopPodSandbox", s))?;
        let id = pod_id.to_string();
        self.try_call("RemovePodSandbox", |mut c| async move {
            c.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
                .await
        })
        .map_err(|s| ("RemovePodSandbox", s))?;
        Ok(())
    }

    /// The CRI log of a container: its lines as (stream, text), in order, parsed from the CRI
    /// format `<RFC 3339 time> <stdout|stderr> <F|P> <text>` (a `P` line continues in the next).
    pub fn log_lines(
        &self,
        pod: &PodSandboxConfig,
        config: &ContainerConfig,
    ) -> Vec<(String, String)> {
        let path = Path::new(&pod.log_directory).join(&config.log_path);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        parse_cri_log(&text)
    }

    /// Polls the container's CRI log until `want` holds of its lines.
    pub fn wait_log(
        &self,
        pod: &PodSandboxConfig,
        config: &ContainerConfig,
        timeout: Duration,
        want: impl Fn(&[(String, String)]) -> bool,
    ) -> Vec<(String, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.log_lines(pod, config);
            if want(&lines) {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "the CRI log of {:?} did not show what was expected within {timeout:?}: {lines:?}",
                config.metadata
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The pod's DNS config as a kubelet sends it for a cluster DNS.
    pub fn cluster_dns(server: &str, search: &str) -> DnsConfig {
        DnsConfig {
            servers: vec![server.into()],
            searches: vec![search.into()],
            options: vec!["ndots:5".into()],
        }
    }

    /// The pod's namespace options (`linux.security_context.namespace_options`), made if absent.
    fn namespace_options(pod: &mut PodSandboxConfig) -> &mut NamespaceOption {
        pod.linux
            .get_or_insert_with(Default::default)
            .security_context
            .get_or_insert_with(Default::default)
            .namespace_options
            .get_or_insert_with(Default::default)
    }

    /// `hostNetwork: true` on a pod config.
    pub fn with_host_network(mut pod: PodSandboxConfig) -> PodSandboxConfig {
        Self::namespace_options(&mut pod).network = NamespaceMode::Node as i32;
        // A kubelet sets no hostname for a hostNetwork pod: it has the node's (runc refuses a
        // hostname without a UTS namespace of the pod's own).
        pod.hostname.clear();
        pod
    }

    /// `shareProcessNamespace: true` on a pod config: its containers join the sandbox
    /// container's PID namespace.
    pub fn with_shared_pid_namespace(mut pod: PodSandboxConfig) -> PodSandboxConfig {
        Self::namespace_options(&mut pod).pid = NamespaceMode::Pod as i32;
        pod
    }

    /// Sandbox sysctls on a pod config.
    pub fn with_sysctls(mut pod: PodSandboxConfig, sysctls: &[(&str, &str)]) -> PodSandboxConfig {
        let linux = pod.linux.get_or_insert_with(Default::default);
        linux.sysctls = sysctls
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>();
        pod
    }
}

/// Parses CRI log text into (stream, text) lines, joining partial (`P`) lines.
pub fn parse_cri_log(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut partial: Option<(String, String)> = None;
    for line in text.lines() {
        let mut parts = line.splitn(4, ' ');
        let (Some(_time), Some(stream), Some(tag)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let content = parts.next().unwrap_or("");
        let (s, mut t) = partial
            .take()
            .unwrap_or_else(|| (stream.to_string(), String::new()));
        t.push_str(content);
        if tag == "P" {
            partial = Some((s, t));
        } else {
            out.push((s, t));
        }
    }
    out.extend(partial);
    out
}

impl Drop for Cri {
    fn drop(&mut self) {
        let pods = self
            .try_call("ListPodSandbox", |mut c| async move {
                c.list_pod_sandbox(ListPodSandboxRequest { filter: None })
                    .await
            })
            .map(|r| r.items)
            .unwrap_or_default();
        for pod in pods {
            let _ = self.try_remove_pod(&pod.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines_are_parsed_and_partial_lines_joined() {
        let text = "2026-12-06T00:00:00.000000001Z stdout F out\n\
                    2026-12-06T00:00:00.000000002Z stderr P er\n\
                    2026-12-06T00:00:00.000000003Z stderr F r two\n\
                    2026-12-06T00:00:00.000000004Z stdout F \n";
        assert_eq!(
            parse_cri_log(text),
            vec![
                ("stdout".to_string(), "out".to_string()),
                ("stderr".to_string(), "err two".to_string()),
                ("stdout".to_string(), String::new()),
            ]
        );
    }
}
