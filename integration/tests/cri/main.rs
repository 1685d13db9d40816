//! Kubernetes pods on the runtime under test, through containerd's CRI plugin: the calls a
//! kubelet makes (RunPodSandbox, CreateContainer, StartContainer, ExecSync, ContainerStatus,
//! RemoveContainer, StopPodSandbox, RemovePodSandbox), with CNI's bridge network from Debian's
//! plugins, asserting what a user of the pod sees. `HUSK_TEST_RUNTIME=io.containerd.runc.v2` runs
//! the same tests with the `runc` handler to prove the harness. Every test ends with nothing of
//! its pods left on the host (processes, mounts, `/run/husk`, pinned network namespaces,
//! interfaces).

mod client;
mod stream;

use std::path::{Path, PathBuf};
use std::time::Duration;

use client::Cri;
use husk_integration::containerd::{Runtime, CNI_SUBNET};
use k8s_cri::v1::{
    ContainerState, LinuxContainerConfig, LinuxContainerResources, PortMapping, Protocol,
};

/// How long a pod's teardown may take to leave nothing behind.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a short container may take to run and exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);

/// The pod's IP as CRI reports it, checked to be in CNI's subnet.
fn pod_ip(cri: &Cri, pod_id: &str) -> String {
    let status = cri.pod_status(pod_id);
    let ip = status
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    let prefix = CNI_SUBNET.trim_end_matches("0/24");
    assert!(
        ip.starts_with(prefix),
        "the pod's CRI-reported IP {ip:?} is not in the CNI subnet {CNI_SUBNET}"
    );
    ip
}

/// The pod's hostPort in the first test.
const HOST_PORT: u16 = 18080;

/// An address of the node (this host): the CNI bridge's gateway, the first of its subnet.
fn node_ip() -> String {
    format!("{}1", CNI_SUBNET.trim_end_matches("0/24"))
}

/// The body of `GET /` from `ip:port`, from this (the host's) network namespace, retried
/// until `timeout` (the server may still be starting).
fn http_get(ip: &str, port: u16, timeout: Duration) -> String {
    http_get_path(ip, port, "/", timeout)
}

/// [`http_get`] of `path`.
fn http_get_path(ip: &str, port: u16, path: &str, timeout: Duration) -> String {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().expect("address");
    let deadline = std::time::Instant::now() + timeout;
    let mut last = String::new();
    while std::time::Instant::now() < deadline {
        let attempt = (|| -> std::io::Result<String> {
            let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply)?;
            Ok(reply)
        })();
        match attempt {
            Ok(reply) => match reply.split_once("\r\n\r\n") {
                Some((_, body)) => return body.to_owned(),
                None => last = format!("a reply without a body: {reply:?}"),
            },
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("GET http://{addr}{path} from the host failed for {timeout:?}: {last}");
}

/// A pod serves on the IP CRI reports: from the host, through CNI's bridge, and from a
/// second pod; inside the pod on localhost, with the pod's IP on its `eth0`; and on its
/// hostPort at the node's address (CNI's portmap).
#[test]
fn a_pod_answers_on_its_ip_from_the_host_and_from_a_second_pod() {
    let cri = Cri::start();
    let mut web = cri.pod_config("web");
    web.port_mappings = vec![PortMapping {
        protocol: Protocol::Tcp as i32,
        container_port: 8080,
        host_port: HOST_PORT.into(),
        host_ip: String::new(),
    }];
    let web_id = cri.run_pod(&web);
    let ip = pod_ip(&cri, &web_id);
    let server = cri.container_config(
        "httpd",
        0,
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo hello-from-$(hostname) > /www/index.html \
             && seq 1 600000 > /www/big && exec httpd -f -p 8080 -h /www",
        ],
    );
    let server_id = cri.start_container(&web_id, &web, server);
    assert_eq!(
        http_get(&ip, 8080, Duration::from_secs(60)),
        "hello-from-web\n",
        "host → pod"
    );
    // A 4.4 MB body crosses in 64 KiB TCP segments where the device offers TSO: every byte
    // must arrive, in order.
    let big = http_get_path(&ip, 8080, "/big", Duration::from_secs(60));
    let want: String = (1..=600_000).map(|i| format!("{i}\n")).collect();
    assert!(
        big == want,
        "host ← pod: /big arrived as {} bytes, not the {} sent (first difference at byte {:?})",
        big.len(),
        want.len(),
        big.bytes().zip(want.bytes()).position(|(a, b)| a != b)
    );
    assert_eq!(
        http_get(&node_ip(), HOST_PORT, Duration::from_secs(30)),
        "hello-from-web\n",
        "host → the pod's hostPort at the node's address"
    );
    assert_eq!(
        cri.exec_ok(&server_id, &["wget", "-qO-", "http://127.0.0.1:8080/"]),
        "hello-from-web\n",
        "the pod → itself on localhost"
    );
    let eth0 = cri.exec_ok(
        &server_id,
        &["ip", "-4", "-o", "addr", "show", "dev", "eth0"],
    );
    assert!(
        eth0.contains(&format!("inet {ip}/24")),
        "the pod's eth0 lacks its CRI-reported IP {ip}: {eth0:?}"
    );

    let client = cri.pod_config("client");
    let client_id = cri.run_pod(&client);
    let main = cri.container_config("main", 0, &["sleep", "100000"]);
    let client_container = cri.start_container(&client_id, &client, main);
    assert_eq!(
        cri.exec_ok(
            &client_container,
            &["wget", "-qO-", &format!("http://{ip}:8080/")]
        ),
        "hello-from-web\n",
        "pod → pod"
    );
    let md5 = |id: &str, cmd: &str| cri.exec_ok(id, &["sh", "-c", cmd]);
    assert_eq!(
        md5(
            &client_container,
            &format!("wget -qO- http://{ip}:8080/big | md5sum")
        ),
        md5(&server_id, "md5sum < /www/big"),
        "pod → pod: the 4.4 MB body"
    );

    cri.remove_pod(&client_id);
    cri.remove_pod(&web_id);
    cri.containerd().assert_no_leftovers(CLEANUP_TIMEOUT);
}

/// One pod as a kubelet runs it: the pod gets an address from CNI, its containers the DNS
/// config and hostname the pod asked for, ExecSync returns stdout, stderr and the exit code
/// apart, the container's output lands in its CRI log file, tagged by stream, and a
/// container whose working directory the image lacks starts in it.
#[test]
fn a_pod_execs_logs_and_resolves_as_a_kubelet_expects() {
    let cri = Cri::start();
    let mut pod = cri.pod_config("web");
    pod.dns_config = Some(Cri::cluster_dns("10.96.0.10", "default.svc.cluster.local"));
    let pod_id = cri.run_pod(&pod);

    pod_ip(&cri, &pod_id);

    let main = cri.container_config(
        "main",
        0,
        &["sh", "-c", "echo out; echo err >&2; exec sleep 100000"],
    );
    let id = cri.start_container(&pod_id, &pod, main.clone());

    let resolv = cri.exec_ok(&id, &["cat", "/etc/resolv.conf"]);
    for want in [
        "nameserver 10.96.0.10",
        "search default.svc.cluster.local",
        "options ndots:5",
    ] {
        assert!(
            resolv.lines().any(|l| l.trim() == want),
            "resolv.conf lacks {want:?}:\n{resolv}"
        );
    }
    assert_eq!(cri.exec_ok(&id, &["hostname"]), "web\n");
    assert_eq!(
        cri.exec_ok(&id, &["sh", "-c", "echo $HUSK_CRI_TEST"]),
        "1\n"
    );

    let r = cri.exec_sync(&id, &["sh", "-c", "echo o; echo e >&2; exit 3"], 60);
    assert_eq!(
        (
            r.exit_code,
            String::from_utf8_lossy(&r.stdout).as_ref(),
            String::from_utf8_lossy(&r.stderr).as_ref()
        ),
        (3, "o\n", "e\n"),
        "ExecSync's exit code, stdout and stderr"
    );

    let lines = cri.wait_log(&pod, &main, Duration::from_secs(30), |l| l.len() >= 2);
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec![
            ("stderr".to_string(), "err".to_string()),
            ("stdout".to_string(), "out".to_string()),
        ],
        "the container's CRI log"
    );

    // A working directory the image lacks is created, as runc creates it.
    let mut wd = cri.container_config("wd", 0, &["pwd"]);
    wd.working_dir = "/created/by/the/runtime".into();
    let wd_id = cri.start_container(&pod_id, &pod, wd.clone());
    let status = cri.wait_exited(&wd_id, EXIT_TIMEOUT);
    assert_eq!(
        status.exit_code, 0,
        "pwd in a missing working_dir: {status:?}"
    );
    assert_eq!(
        cri.log_lines(&pod, &wd),
        vec![("stdout".to_string(), "/created/by/the/runtime".to_string())]
    );

    cri.remove_pod(&pod_id);
    cri.containerd().assert_no_leftovers(CLEANUP_TIMEOUT);
}

/// `kubectl exec` and `kubectl attach`: CRI's Exec and Attach return a URL on containerd's
/// streaming server, and the session runs over it (the websocket remote-command protocol):
/// an exec's stdin reaches the process, its stdout and stderr come back apart and its exit code
/// in the final status; a terminal exec takes a resize and its shell sees the new size; an
/// attach writes to the container's own stdin and reads its output, which also lands in the
/// container's CRI log.
#[test]
fn streaming_exec_and_attach_reach_the_container_as_kubectl_does() {
    const STREAM_TIMEOUT: Duration = Duration::from_secs(60);
    let cri = Cri::start();
    let pod = cri.pod_config("shell");
    let pod_id = cri.run_pod(&pod);
    let mut config = cri.container_config(
        "echo",
        0,
        &[
            "sh",
            "-c",
            "while read line; do echo \"out:$line\"; echo \"err:$line\" >&2; done",
        ],
    );
    config.stdin = true;
    let id = cri.start_container(&pod_id, &pod, config.clone());

    // An exec with stdin, stdout and stderr, exiting non-zero.
    let mut exec = cri.exec(
        &id,
        &[
            "sh",
            "-c",
            "read x; echo \"out:$x\"; echo \"err:$x\" >&2; exit 7",
        ],
        true,
        false,
    );
    exec.stdin(b"hello\n");
    let out = exec.finish(STREAM_TIMEOUT);
    assert_eq!(
        (out.stdout(), out.stderr(), out.exit_code()),
        ("out:hello\n".into(), "err:hello\n".into(), Some(7)),
        "a streaming exec's stdout, stderr and exit code: {out:?}"
    );
    let out = cri
        .exec(&id, &["true"], false, false)
        .finish(STREAM_TIMEOUT);
    assert_eq!(
        out.exit_code(),
        Some(0),
        "a streaming exec of true: {out:?}"
    );

    // A terminal exec: the shell sees the size the client sets, and its `exit` is the code.
    let mut shell = cri.exec(&id, &["sh"], true, true);
    shell.resize(123, 45);
    let deadline = std::time::Instant::now() + STREAM_TIMEOUT;
    let sized = |o: &stream::Output| o.stdout().contains("45 123");
    loop {
        // The resize and stdin travel apart, so ask until the size has arrived.
        shell.stdin(b"stty size\n");
        if shell.try_wait_for(Duration::from_secs(2), sized).is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the terminal's size never became 45 rows, 123 columns: {:?}",
            shell.output().stdout()
        );
    }
    shell.stdin(b"exit 5\n");
    let out = shell.finish(STREAM_TIMEOUT);
    assert_eq!(out.exit_code(), Some(5), "a terminal exec's exit: {out:?}");

    // Attach to the container's own stdio.
    let mut attach = cri.attach(&id, true, false);
    attach.stdin(b"ping\n");
    attach.wait_for(STREAM_TIMEOUT, |o| {
        o.stdout().contains("out:ping\n") && o.stderr().contains("err:ping\n")
    });
    attach.close();
    let has = |lines: &[(String, String)], stream: &str, text: &str| {
        lines.iter().any(|(s, t)| s == stream && t == text)
    };
    cri.wait_log(&pod, &config, Duration::from_secs(30), |l| {
        has(l, "stdout", "out:ping") && has(l, "stderr", "err:ping")
    });
    assert_eq!(
        cri.container_status(&id).state(),
        ContainerState::ContainerRunning,
        "the attached container still runs after the client left"
    );

    cri.remove_pod(&pod_id);
    cri.containerd().assert_no_leftovers(CLEANUP_TIMEOUT);
}

/// critest's restart: a container writes to a host path volume and exits, is removed, and its
/// successor (attempt 1) in the same pod reads what it wrote; a read-only host path refuses a
/// write. Under husk both containers run in the pod's one VM, which lives until the pod ends.
#[test]
fn a_restarted_container_reads_what_its_predecessor_wrote() {
    let cri = Cri::start();
    let volume = tempfile::tempdir().expect("volume dir");
    let readonly = tempfile::tempdir().expect("read-only volume dir");
    std::fs::write(readonly.path().join("given"), "from the host\n").unwrap();
    let pod = cri.pod_config("restart");
    let pod_id = cri.run_pod(&pod);
    let vmms = || cri.containerd().leftovers().count_program("husk-vmm");
    let vmms_with_pod = vmms();
    if cri.runtime() == Runtime::Husk {
        assert!(vmms_with_pod >= 1, "no husk-vmm runs the pod");
    }

    let mounts = vec![
        Cri::host_path(volume.path(), "/data", false),
        Cri::host_path(readonly.path(), "/given", true),
    ];
    let mut first = cri.container_config(
        "app",
        0,
        &[
            "sh",
            "-c",
            "echo written-by-attempt-0 > /data/note && cat /given/given \
             && if echo x > /given/new; then exit 9; fi",
        ],
    );
    first.mounts = mounts.clone();
    let id = cri.start_container(&pod_id, &pod, first.clone());
    let status = cri.wait_exited(&id, EXIT_TIMEOUT);
    assert_eq!(status.exit_code, 0, "attempt 0: {status:?}");
    let lines = cri.log_lines(&pod, &first);
    assert!(
        lines.contains(&("stdout".into(), "from the host".into())),
        "attempt 0 did not read the read-only volume: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|(s, t)| s == "stderr" && t.contains("Read-only file system")),
        "attempt 0's write to the read-only volume was not refused as runc refuses it: {lines:?}"
    );
    assert!(!readonly.path().join("new").exists());
    cri.remove_container(&id);

    let mut second = cri.container_config("app", 1, &["cat", "/data/note"]);
    second.mounts = mounts;
    let id = cri.start_container(&pod_id, &pod, second.clone());
    let status = cri.wait_exited(&id, EXIT_TIMEOUT);
    assert_eq!(status.exit_code, 0, "attempt 1: {status:?}");
    assert_eq!(
        cri.log_lines(&pod, &second),
        vec![("stdout".to_string(), "written-by-attempt-0".to_string())]
    );
    assert_eq!(
        std::fs::read_to_string(volume.path().join("note")).unwrap(),
        "written-by-attempt-0\n"
    );
    assert_eq!(
        vmms(),
        vmms_with_pod,
        "the pod's VM changed between its containers"
    );
    cri.remove_container(&id);

    cri.remove_pod(&pod_id);
    cri.containerd().assert_no_leftovers(CLEANUP_TIMEOUT);
}

/// What a kubelet reads of containers that fail, as under runc: one the OOM killer ends at its
/// memory limit exits 137 with the reason `OOMKilled`; one whose command does not exist fails
/// to start, is reported exited with containerd's `StartError` naming the command, is removed
/// at once, and the pod goes on running containers.
#[test]
fn oom_killed_and_unstartable_containers_report_as_under_runc() {
    let cri = Cri::start();
    let pod = cri.pod_config("failing");
    let pod_id = cri.run_pod(&pod);

    // dd's 64 MiB buffer, filled from /dev/zero, cannot fit under a 32 MiB limit.
    let mut hog = cri.container_config(
        "hog",
        0,
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
    );
    hog.linux = Some(LinuxContainerConfig {
        resources: Some(LinuxContainerResources {
            memory_limit_in_bytes: 32 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let hog_id = cri.start_container(&pod_id, &pod, hog);
    let status = cri.wait_exited(&hog_id, EXIT_TIMEOUT);
    assert_eq!(
        (status.exit_code, status.reason.as_str()),
        (137, "OOMKilled"),
        "the OOM-killed container's status: {status:?}"
    );
    cri.remove_container(&hog_id);

    let missing = cri.container_config("missing", 0, &["/no/such/binary"]);
    let missing_id = cri.create_container(&pod_id, &pod, missing);
    let started = std::time::Instant::now();
    let err = cri
        .try_start_container(&missing_id)
        .expect_err("a container without its command started");
    assert!(
        err.message().contains("/no/such/binary"),
        "StartContainer's error does not name the missing command: {:?}: {}",
        err.code(),
        err.message()
    );
    let status = cri.container_status(&missing_id);
    assert_eq!(
        (status.state, status.exit_code, status.reason.as_str()),
        (ContainerState::ContainerExited as i32, 128, "StartError"),
        "the unstartable container's status: {status:?}"
    );
    cri.remove_container(&missing_id);
    // containerd gives a failed start's cleanup a minute; runc needs no part of it.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the failed start and its removal took {:?}",
        started.elapsed()
    );

    let after = cri.container_config("after", 0, &["sleep", "100000"]);
    let after_id = cri.start_container(&pod_id, &pod, after);
    assert_eq!(
        cri.exec_ok(&after_id, &["echo", "still-serving"]),
        "still-serving\n"
    );

    cri.remove_pod(&pod_id);
    cri.containerd().assert_no_leftovers(CLEANUP_TIMEOUT);
}

/// A pod cgroup as a kubelet with the cgroupfs driver makes it, `/husk-test-kubepods/pod<uid>`,
/// with the memory and pids controllers enabled down to it; removed on drop.
struct KubeletPodCgroup {
    top: PathBuf,
    dir: PathBuf,
}

impl KubeletPodCgroup {
    const ROOT: &'static str = "/sys/fs/cgroup";

    fn new(uid: &str) -> Self {
        let root = Path::new(Self::ROOT);
        assert!(
            root.join("cgroup.controllers").is_file(),
            "this test needs cgroup v2 at {} (the lab mounts it)",
            Self::ROOT
        );
        let top = root.join("husk-test-kubepods");
        let dir = top.join(format!("pod{uid}"));
        std::fs::create_dir_all(&dir).expect("the pod's cgroup");
        for at in [root, top.as_path()] {
            std::fs::write(at.join("cgroup.subtree_control"), "+memory +pids")
                .unwrap_or_else(|e| panic!("enable memory and pids under {}: {e}", at.display()));
        }
        Self { top, dir }
    }

    /// The cgroup as CRI's `cgroup_parent` names it.
    fn parent(&self) -> String {
        format!("/{}", self.dir.strip_prefix(Self::ROOT).unwrap().display())
    }

    /// The processes in the pod's cgroup and below it.
    fn pids(&self) -> Vec<i32> {
        fn walk(dir: &Path, out: &mut Vec<i32>) {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            out.extend(procs.lines().filter_map(|l| l.parse::<i32>().ok()));
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.dir, &mut out);
        out
    }

    /// The cgroups left under the pod's.
    fn children(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect()
    }
}

impl Drop for KubeletPodCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
        let _ = std::fs::remove_dir(&self.top);
    }
}

/// A process's name and the memory it holds (RssAnon + RssShmem), in bytes.
fn process_memory(pid: i32) -> Option<(String, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let name = status
        .lines()
        .next()?
        .strip_prefix("Name:")?
        .trim()
        .to_owned();
    Some((name, field("RssAnon:") + field("RssShmem:")))
}

/// The pod's host cost lives in the pod's cgroup (item 7): every process that runs the pod is in
/// the cgroup a kubelet made for it (under husk the VMM, its waiter and virtiofsd, under runc the
/// pause and the app), so the kubelet's pod limits bind them, and PodSandboxStats reports at least the
/// memory they hold. When the pod is gone, no cgroup of its is left under the kubelet's.
#[test]
fn the_pods_cgroup_holds_its_cost_and_pod_sandbox_stats_reports_it() {
    let cri = Cri::start();
    let cgroup = KubeletPodCgroup::new("stats");
    let mut pod = cri.pod_config("stats");
    pod.linux.get_or_insert_with(Default::default).cgroup_parent = cgroup.parent();
    let pod_id = cri.run_pod(&pod);
    let main = cri.container_config("main", 0, &["sleep", "100000"]);
    cri.start_container(&pod_id, &pod, main);

    let held: Vec<(String, u64)> = cgroup
        .pids()
        .into_iter()
        .filter_map(process_memory)
        .collect();
    let names: Vec<&str> = held.iter().map(|(n, _)| n.as_str()).collect();
    // At least these many processes of each name (the test's pause image runs `sleep`).
    let expected: &[(&str, usize)] = match cri.runtime() {
        Runtime::Husk => &[("husk-vmm", 2), ("virtiofsd", 1)],
        Runtime::Runc => &[("sleep", 2)],
    };
    for &(want, count) in expected {
        assert!(
            names.iter().filter(|n| **n == want).count() >= count,
            "fewer than {count} {want} in the pod's cgroup {}: {names:?}",
            cgroup.parent()
        );
    }
    let memory = cri
        .pod_stats(&pod_id)
        .linux
        .and_then(|l| l.memory)
        .expect("PodSandboxStats without memory");
    let working_set = memory.working_set_bytes.map_or(0, |v| v.value);
    let total: u64 = held.iter().map(|(_, b)| b).sum();
    assert!(
        working_set >= total * 8 / 10,
        "PodSandboxStats' working set ({working_set} bytes) misses what the pod's processes \
         hold ({total} bytes: {held:?})"
    );
    eprintln!("pod working set {working_set} bytes; its processes hold {total}: {held:?}");

    cri.remove_pod(&pod_id);
    cri.containerd().assert_no_leftovers(CLEANUP_TIMEOUT);
    assert_eq!(
        cgroup.children(),
        Vec::<PathBuf>::new(),
        "cgroups left in the pod's"
    );
}

/// A pod's namespaced sysctls (here `net.ipv4.ip_unprivileged_port_start`, which Kubernetes
/// allows by default) apply to its containers; with `shareProcessNamespace` its container
/// sees the sandbox (pause) container's process as PID 1, and its own among the others.
#[test]
fn sandbox_sysctls_and_the_shared_pid_namespace_reach_the_pods_containers() {
    let cri = Cri::start();
    let pod = Cri::with_shared_pid_namespace(Cri::with_sysctls(
        cri.pod_config("sysctls"),
        &[("net.ipv4.ip_unprivileged_port_start", "80")],
    ));
    let pod_id = cri.run_pod(&pod);
    let main = cri.container_config("main", 0, &["sleep", "100000"]);
    let id = cri.start_container(&pod_id, &pod, main);
    assert_eq!(
        cri.exec_ok(
            &id,
            &["cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"]
        ),
        "80\n"
    );
    // The pause image's command is `sleep 2147483647`; the container's own is `sleep 100000`.
    assert_eq!(
        cri.exec_ok(&id, &["cat", "/proc/1/cmdline"]),
        "sleep\x002147483647\x00",
        "PID 1 of the shared namespace is the sandbox container's process"
    );
    let cmdlines = cri.exec_ok(&id, &["sh", "-c", "cat /proc/[0-9]*/cmdline"]);
    assert!(
        cmdlines.contains("sleep\x00100000\x00"),
        "the container's own process in the shared namespace: {cmdlines:?}"
    );
    cri.remove_pod(&pod_id);
    cri.containerd().assert_no_leftovers(CLEANUP_TIMEOUT);
}

/// A hostNetwork pod: runc runs it in the host's network namespace; husk refuses it with the
/// reason (a VM cannot share the host's network stack) and leaves nothing behind.
#[test]
fn a_host_network_pod_is_refused_with_the_reason_under_husk() {
    let cri = Cri::start();
    let pod = Cri::with_host_network(cri.pod_config("hostnet"));
    match cri.runtime() {
        Runtime::Husk => {
            let err = cri
                .try_run_pod(&pod)
                .expect_err("husk ran a hostNetwork pod");
            assert!(
                err.message().contains("husk cannot run a hostNetwork pod"),
                "RunPodSandbox's error does not say why: {:?}: {}",
                err.code(),
                err.message()
            );
        }
        Runtime::Runc => {
            let pod_id = cri.run_pod(&pod);
            cri.remove_pod(&pod_id);
        }
    }
    cri.containerd().assert_no_leftovers(CLEANUP_TIMEOUT);
}
