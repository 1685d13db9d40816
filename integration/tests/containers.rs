//! Component tests of the agent's container API: a real guest (our kernel, the agent as PID 1)
//! under husk-vmm, busybox containers made by libcontainer in the guest, stdio over vsock.
//!
//! The rootfs lies in a host directory that a real virtiofsd shares with the guest (see
//! `husk_integration::pod`). Run through `cargo xtask test`.

use std::time::{Duration, Instant};

use husk_integration::pod::{process, sandbox_request, spec, Pod, WAIT};
use husk_shim::agent::{AgentError, StdioConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A deterministic byte pattern of `len` bytes (what `yes 0123456789abcde | head -c len` prints).
fn pattern(len: usize) -> Vec<u8> {
    b"0123456789abcde\n"
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

fn code_of(e: &AgentError) -> Option<ttrpc::Code> {
    match e {
        AgentError::Status { code, .. } => Some(*code),
        _ => None,
    }
}

#[test]
fn stdio_exit_status_stdin_tty_and_bulk_output() {
    runtime().block_on(async {
        let pod = Pod::boot(256).await;

        // Exactly `out`, `err` and status 7.
        let o = pod
            .run(
                "c1",
                &spec(&["sh", "-c", "echo out; echo err >&2; exit 7"]),
                None,
            )
            .await;
        assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
        assert_eq!(String::from_utf8_lossy(&o.stderr), "err\n");
        assert_eq!(o.status, 7);

        // The spec's seccomp profile is enforced (compiled without libseccomp); unknown
        // syscall names are skipped.
        let mut s = spec(&["sh", "-c", "mkdir /tmp/x; echo rc=$?"]);
        s["linux"]["seccomp"] = serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat", "no_such_syscall"],
                          "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
        });
        let o = pod.run("c5", &s, None).await;
        assert_eq!(String::from_utf8_lossy(&o.stdout), "rc=1\n");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("Operation not permitted"),
            "mkdir under seccomp: {err:?}"
        );

        // 10 MiB of stdin round-trips through `cat`, and the host's half-close is cat's EOF.
        let input: Vec<u8> = (0..10 * 1024 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        let t = Instant::now();
        let o = pod.run("c2", &spec(&["cat"]), Some(input.clone())).await;
        eprintln!("10 MiB cat round trip: {:?}", t.elapsed());
        assert_eq!(
            o.status,
            0,
            "stderr: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            o.stdout == input,
            "cat returned {} bytes, not the 10 MiB sent byte-exact",
            o.stdout.len()
        );

        // 100 MiB of output passes byte-exact, and the exit comes after all of it.
        let len = 100 * 1024 * 1024;
        let t = Instant::now();
        let o = pod
            .run(
                "c3",
                &spec(&["sh", "-c", &format!("yes 0123456789abcde | head -c {len}")]),
                None,
            )
            .await;
        eprintln!("100 MiB of output: {:?}", t.elapsed());
        assert_eq!(o.status, 0);
        assert_eq!(o.stdout.len(), len);
        assert!(o.stdout == pattern(len), "100 MiB output differs");

        // tty mode: one stream on a guest pty; a resize is seen by `stty size`.
        let tty = StdioConfig {
            tty: true,
            tty_rows: 24,
            tty_cols: 80,
            ..Default::default()
        };
        let script = "stty size; read line; stty size; echo got $line";
        let mut streams = pod.create("c4", &spec(&["sh", "-c", script]), tty).await;
        pod.client.start_container("c4").await.expect("start c4");
        let mut stream = streams.stdin.take().expect("tty stream");
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("24 80") {
            let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
                .await
                .expect("tty output in time")
                .expect("tty read");
            assert!(
                n > 0,
                "tty closed early: {:?}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
        pod.client
            .tty_win_resize("c4", "", 40, 132)
            .await
            .expect("TtyWinResize");
        stream.write_all(b"hello\n").await.expect("tty write");
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
            .await
            .expect("tty EOF in time")
            .expect("tty read");
        let text = String::from_utf8_lossy(&rest);
        assert!(text.contains("40 132"), "stty after resize: {text:?}");
        assert!(text.contains("got hello"), "tty input: {text:?}");
        let w = pod
            .client
            .wait_process("c4", "", WAIT)
            .await
            .expect("wait c4");
        assert_eq!(w.exit_status, 0);
        pod.client
            .remove_container("c4", false)
            .await
            .expect("remove c4");

        pod.shutdown().await;
    });
}

#[test]
fn exec_signals_pause_stats_and_remove() {
    runtime().block_on(async {
        let pod = Pod::boot(256).await;
        let none = StdioConfig::default();
        let mut s = spec(&[
            "sh",
            "-c",
            "trap 'exit 42' TERM; while true; do sleep 1; done",
        ]);
        s["linux"]["resources"]["memory"] = serde_json::json!({"limit": 64 * 1024 * 1024});
        pod.create("c1", &s, none.clone()).await;
        let init_pid = pod.client.start_container("c1").await.expect("start c1");

        // A second process in the running container, with its own streams.
        let io = StdioConfig {
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let streams = pod.open_streams("c1", "e1", &io).await;
        let proc_json =
            serde_json::to_vec(&process(&["sh", "-c", "echo in-container; hostname"])).unwrap();
        pod.client
            .exec_process("c1", "e1", proc_json, io)
            .await
            .unwrap_or_else(|e| panic!("ExecProcess: {e}\n{}", pod.diagnostics()));
        let o = pod.collect("c1", "e1", streams, None).await;
        assert_eq!(o.status, 0, "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            "in-container\ncontainer\n"
        );

        // ListProcesses gives real guest pids, the init pid among them.
        let pids = pod
            .client
            .list_processes("c1")
            .await
            .expect("ListProcesses");
        assert!(
            pids.contains(&init_pid),
            "init pid {init_pid} not in {pids:?}"
        );

        // Stats show memory and pids.
        let stats = pod
            .client
            .stats_container("c1")
            .await
            .expect("StatsContainer");
        let mem = stats.memory.as_ref().expect("memory stats");
        assert!(mem.usage_bytes > 0, "{stats:?}");
        assert_eq!(mem.limit_bytes, 64 * 1024 * 1024);
        let p = stats.pids.as_ref().expect("pids stats");
        // The shell, and its `sleep 1` most of the time.
        assert!((1..=2).contains(&p.current), "{stats:?}");
        assert_eq!(p.limit, 128);

        // UpdateContainer changes the memory limit.
        pod.client
            .update_container("c1", br#"{"memory": {"limit": 100663296}}"#.to_vec())
            .await
            .expect("UpdateContainer");
        let stats = pod.client.stats_container("c1").await.expect("stats");
        assert_eq!(stats.memory.as_ref().unwrap().limit_bytes, 100_663_296);

        // Pause freezes: a paused container does not react to SIGTERM until resumed, not
        // even to one for all its processes (which freezes and thaws the cgroup of a running
        // container, and must leave a paused one frozen).
        pod.client.pause_container("c1").await.expect("Pause");
        pod.client
            .signal_process("c1", "", libc::SIGTERM, true)
            .await
            .expect("SIGTERM");
        let early = tokio::time::timeout(
            Duration::from_secs(3),
            pod.client.wait_process("c1", "", WAIT),
        )
        .await;
        assert!(early.is_err(), "a paused container exited: {early:?}");
        pod.client.resume_container("c1").await.expect("Resume");
        let w = pod
            .client
            .wait_process("c1", "", WAIT)
            .await
            .expect("wait c1");
        assert_eq!(w.exit_status, 42, "the TERM trap did not run");
        pod.client
            .remove_container("c1", false)
            .await
            .expect("remove c1");

        // SIGKILL.
        pod.create("c2", &spec(&["sleep", "1000"]), none.clone())
            .await;
        pod.client.start_container("c2").await.expect("start c2");
        pod.client
            .signal_process("c2", "", libc::SIGKILL, false)
            .await
            .expect("SIGKILL");
        let w = pod
            .client
            .wait_process("c2", "", WAIT)
            .await
            .expect("wait c2");
        assert_eq!((w.exit_status, w.signal), (128 + 9, 9));
        pod.client
            .remove_container("c2", false)
            .await
            .expect("remove c2");

        // Removal leaves no mounts behind in the agent's mount namespace (a container may not
        // share the agent's PID namespace to read it, so the agent reports its mount points).
        let details = pod.client.guest_details().await.expect("GetGuestDetails");
        let mounts = details.mount_points.join("\n");
        assert!(
            details.mount_points.iter().any(|m| m == "/run/husk/shared"),
            "no share in {mounts}"
        );
        for leftover in ["bb/rootfs", "/run/husk/bundles", "youki", "/c1/", "/c2/"] {
            assert!(
                !mounts.contains(leftover),
                "{leftover} still mounted:\n{mounts}"
            );
        }
        pod.shutdown().await;
    });
}

#[test]
fn bad_requests_are_refused_and_oom_is_reported() {
    runtime().block_on(async {
        let pod = Pod::boot(256).await;
        let c = &pod.client;
        let none = StdioConfig::default();
        let ok = serde_json::to_vec(&spec(&["true"])).unwrap();
        let expect = |r: Result<u32, AgentError>, code: ttrpc::Code, what: &str| match r {
            Err(e) if code_of(&e) == Some(code) => {}
            other => panic!("{what}: expected {code:?}, got {other:?}"),
        };
        use ttrpc::Code;
        // Rootfs through symlinks that leave the share.
        for id in ["escape-abs", "escape-rel"] {
            expect(c.create_container(id, ok.clone(), none.clone()).await, Code::INVALID_ARGUMENT, id);
        }
        // `..` and other invalid ids, a container without a rootfs.
        for id in ["..", "a/b", "../c1", ""] {
            expect(c.create_container(id, ok.clone(), none.clone()).await, Code::INVALID_ARGUMENT, id);
        }
        expect(c.create_container("nope", ok.clone(), none.clone()).await, Code::INVALID_ARGUMENT, "no rootfs");
        // Joining the PID namespace of a container that does not exist (never the agent's).
        expect(c.create_container_joining("c1", ok.clone(), none.clone(), "nope").await, Code::NOT_FOUND, "pid namespace of none");
        expect(c.create_container_joining("c1", ok.clone(), none.clone(), "..").await, Code::INVALID_ARGUMENT, "pid namespace of ..");
        // Malformed and oversized specs.
        expect(c.create_container("c1", b"{\"ociVersion\":".to_vec(), none.clone()).await, Code::INVALID_ARGUMENT, "malformed");
        expect(c.create_container("c1", vec![b' '; 600 * 1024], none.clone()).await, Code::INVALID_ARGUMENT, "oversized");
        // Mount sources outside the share, and `..` in a destination.
        for (src, dst) in [
            ("/tmp", "/mnt"),
            ("/run/husk/shared/../../../tmp", "/mnt"),
            ("/run/husk/shared/escape-abs/rootfs/tmp", "/mnt"),
            ("/run/husk/shared/vol", "/mnt/../../x"),
        ] {
            let mut s = spec(&["true"]);
            s["mounts"].as_array_mut().unwrap().push(serde_json::json!(
                {"destination": dst, "type": "bind", "source": src, "options": ["rbind", "ro"]}));
            expect(c.create_container("c1", serde_json::to_vec(&s).unwrap(), none.clone()).await, Code::INVALID_ARGUMENT, src);
        }
        // What husk never sends: a namespace joined by path (the agent's own), no PID
        // namespace of its own, a disk or a second share mount, /dev/mem and a disk node.
        type Edit = fn(&mut serde_json::Value);
        let edits: [(&str, Edit); 6] = [
            ("netns path", |s| s["linux"]["namespaces"].as_array_mut().unwrap().push(serde_json::json!({"type": "network", "path": "/proc/1/ns/net"}))),
            ("no pid namespace", |s| s["linux"]["namespaces"] = serde_json::json!([{"type": "mount"}])),
            ("ext4 mount", |s| s["mounts"].as_array_mut().unwrap().push(serde_json::json!({"destination": "/disk", "type": "ext4", "source": "/dev/vda"}))),
            ("virtiofs mount", |s| s["mounts"].as_array_mut().unwrap().push(serde_json::json!({"destination": "/share", "type": "virtiofs", "source": "husk"}))),
            ("/dev/mem", |s| s["linux"]["devices"] = serde_json::json!([{"path": "/dev/mem", "type": "c", "major": 1, "minor": 1}])),
            ("block device", |s| s["linux"]["devices"] = serde_json::json!([{"path": "/dev/vda", "type": "b", "major": 254, "minor": 0}])),
        ];
        for (what, edit) in edits {
            let mut s = spec(&["true"]);
            edit(&mut s);
            expect(c.create_container("c1", serde_json::to_vec(&s).unwrap(), none.clone()).await, Code::INVALID_ARGUMENT, what);
        }
        // Declared streams that never come: a typed error after the bound, nothing left.
        let io = StdioConfig { stdout: true, ..Default::default() };
        expect(c.create_container("c1", ok.clone(), io).await, Code::DEADLINE_EXCEEDED, "no streams");
        // Unknown ids.
        match c.start_container("c9").await {
            Err(e) if code_of(&e) == Some(Code::NOT_FOUND) => {}
            other => panic!("start of unknown: {other:?}"),
        }
        match c.wait_process("c9", "", WAIT).await {
            Err(e) if code_of(&e) == Some(Code::NOT_FOUND) => {}
            other => panic!("wait of unknown: {other:?}"),
        }
        // A second sandbox, valid in itself (the one the pod was booted with), and an
        // invalid one (no share): the first is refused as existing, the second as invalid.
        let refused = |r: Result<(), AgentError>, code: Code, message: &str, what: &str| match r {
            Err(AgentError::Status { code: got, message: m, .. }) if got == code && m.contains(message) => {}
            other => panic!("{what}: expected {code:?} with {message:?}, got {other:?}"),
        };
        refused(c.create_sandbox(&sandbox_request()).await, Code::ALREADY_EXISTS, "The sandbox exists already", "second sandbox");
        refused(c.create_sandbox(&Default::default()).await, Code::INVALID_ARGUMENT, "Invalid sandbox request", "sandbox without a share");

        // The agent still serves, and c1 (refused above) is created cleanly now, with a
        // volume from the share; a duplicate is refused.
        c.check().await.expect("Health.Check after refusals");
        let mut s = spec(&["cat", "/mnt/hello.txt"]);
        s["mounts"].as_array_mut().unwrap().push(serde_json::json!(
            {"destination": "/mnt", "type": "bind", "source": "/run/husk/shared/vol", "options": ["rbind", "ro"]}));
        let streams = pod.create("c1", &s, StdioConfig { stdout: true, stderr: true, ..Default::default() }).await;
        expect(c.create_container("c1", ok.clone(), none.clone()).await, Code::ALREADY_EXISTS, "duplicate");
        c.start_container("c1").await.expect("start c1");
        let o = pod.collect("c1", "", streams, None).await;
        assert_eq!(String::from_utf8_lossy(&o.stdout), "hello from the share\n", "{}", String::from_utf8_lossy(&o.stderr));
        c.remove_container("c1", false).await.expect("remove c1");

        // Exceeding a memory limit gives an OOM event naming the container.
        let mut s = spec(&["sh", "-c", "v=$(head -c 200000000 /dev/zero | tr '\\0' x); echo survived"]);
        s["linux"]["resources"]["memory"] = serde_json::json!({"limit": 16 * 1024 * 1024, "swap": 16 * 1024 * 1024});
        pod.create("c2", &s, none.clone()).await;
        c.start_container("c2").await.expect("start c2");
        let oom = c.get_oom_event(WAIT).await.unwrap_or_else(|e| panic!("GetOOMEvent: {e}\n{}", pod.diagnostics()));
        assert_eq!(oom, "c2");
        let w = c.wait_process("c2", "", WAIT).await.expect("wait c2");
        assert_ne!(w.exit_status, 0);
        let stats = c.stats_container("c2").await.expect("stats c2");
        assert!(stats.memory.as_ref().unwrap().oom_kill_count >= 1);
        c.remove_container("c2", false).await.expect("remove c2");

        // A container's process talks to the agent over vsock loopback (its own CID and the
        // local one, both agent ports): the agent must not serve it. Without the peer check
        // the Health.Check on port 1024 is answered.
        let probe = husk_integration::required_path("HUSK_FS_PROBE");
        std::fs::copy(&probe, pod.share.path().join("vol/husk-fs-probe")).expect("copy the probe into the share");
        let mut s = spec(&["/mnt/husk-fs-probe"]);
        s["process"]["env"].as_array_mut().unwrap().push(serde_json::json!("probe_mode=vsock"));
        s["mounts"].as_array_mut().unwrap().push(serde_json::json!(
            {"destination": "/mnt", "type": "bind", "source": "/run/husk/shared/vol", "options": ["rbind", "ro"]}));
        let o = pod.run("c3", &s, None).await;
        let out = String::from_utf8_lossy(&o.stdout);
        let attempts: Vec<&str> = out.lines().filter(|l| l.starts_with("PROBE VSOCK")).collect();
        assert_eq!(attempts.len(), 4, "probe output: {out}\n{}", String::from_utf8_lossy(&o.stderr));
        for line in attempts {
            assert!(!line.contains("answered"), "a container reached the agent: {line}");
        }
        c.check().await.expect("Health.Check from the host after the container's attempts");
        pod.shutdown().await;
    });
}
