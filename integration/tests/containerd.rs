//! End-to-end tests: a real containerd (Debian's 1.6), driven with `ctr`, running the busybox
//! image xtask builds, on the runtime in `$HUSK_TEST_RUNTIME`.
//!
//! With `io.containerd.husk.v2` (the default, what CI runs) every pod is a husk VM; with
//! `io.containerd.runc.v2` the same tests prove the harness without a VM. Two tests differ by
//! runtime, both ways asserting what a user would see: `uname -r` is the guest kernel's release
//! under husk and the host's under runc, and "the pod dies under the task" is a SIGKILL of
//! husk-vmm under husk and of the container's init under runc. Every test ends by asserting
//! that nothing of its pods is left on the host. Run through `cargo xtask test`.

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

use husk_integration::containerd::{assert_ok, wait_timeout, Containerd, Runtime, CTR_TIMEOUT};
use husk_integration::required_path;

/// How long the pods of a test may take to disappear after their last task is deleted.
const CLEANUP: Duration = Duration::from_secs(60);
/// How long a detached task may take to be reported running (a VM boot in the lab).
const START: Duration = Duration::from_secs(240);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// How long an event may take to show up in `ctr events`.
const EVENT: Duration = Duration::from_secs(60);

/// Deletes a stopped task and its container.
fn delete(c: &Containerd, id: &str) {
    c.ctr_ok(&["task", "delete", id]);
    c.ctr_ok(&["container", "delete", id]);
}

/// The topics of the task events about `id`, in order.
fn task_topics(c: &Containerd, id: &str) -> Vec<String> {
    c.events()
        .into_iter()
        .filter(|e| e.topic.starts_with("/tasks/") && e.container_id() == Some(id))
        .map(|e| e.topic)
        .collect()
}

/// `ctr run -d <flags> IMAGE id argv…`, then waits until the task is reported running.
fn run_detached(c: &Containerd, flags: &[&str], id: &str, argv: &[&str]) {
    let mut all = vec!["-d"];
    all.extend_from_slice(flags);
    let mut args = c.run_args(&all, id);
    args.extend_from_slice(argv);
    assert_ok(&c.ctr(&args), &format!("ctr run -d {id}"));
    c.wait_task_status(id, "RUNNING", START);
}

/// Asserts that `pods` pods run: as many shims and, under husk, two husk-vmm processes each
/// (the VMM and the waiter outside its PID namespace).
fn assert_pod_processes(c: &Containerd, pods: usize) {
    let left = c.leftovers();
    let shim = c.runtime().shim_binary();
    assert_eq!(
        left.count_program(shim),
        pods,
        "{pods} pod(s), shims:\n{left}"
    );
    if c.runtime() == Runtime::Husk {
        assert_eq!(
            left.count_program("husk-vmm"),
            2 * pods,
            "{pods} pod(s), a VMM and its waiter each:\n{left}"
        );
    }
}

#[test]
fn run_rm_echo_prints_and_exits_zero() {
    let c = Containerd::start();
    let t = Instant::now();
    let out = c.run(&["--rm"], "echo", &["echo", "hello", "from", "husk"]);
    eprintln!(
        "ctr run --rm echo ({}): {:?}",
        c.runtime().name(),
        t.elapsed()
    );
    assert_ok(&out, "ctr run --rm echo");
    assert_eq!(text(&out.stdout), "hello from husk\n");
    let listed = c.ctr_ok(&["containers", "ls", "-q"]);
    assert!(listed.trim().is_empty(), "--rm left containers: {listed}");
    c.wait_event("/tasks/delete", "echo", EVENT);
    assert_eq!(
        task_topics(&c, "echo"),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    assert_eq!(c.wait_exit("echo", "", EVENT).exit_status(), 0);
    c.assert_no_leftovers(CLEANUP);
}

#[test]
fn exit_code_propagates() {
    let c = Containerd::start();
    let out = c.run(&["--rm"], "exit42", &["sh", "-c", "echo bye >&2; exit 42"]);
    assert_eq!(out.status.code(), Some(42), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("bye"), "{}", text(&out.stderr));
    assert_eq!(c.wait_exit("exit42", "", EVENT).exit_status(), 42);
    c.assert_no_leftovers(CLEANUP);
}

/// A container with a network namespace of its own (what `ctr run` asks for) reaches its own
/// services on 127.0.0.1, as under runc, which brings `lo` up in every network namespace it
/// creates: a TCP round trip through busybox `nc` on localhost.
#[test]
fn a_container_reaches_itself_on_localhost() {
    let c = Containerd::start();
    let script = "nc -l -p 5000 > /tmp/got & server=$!
        ok=no
        for i in 1 2 3 4 5 6 7 8 9 10; do
            if echo hello-lo | nc 127.0.0.1 5000; then ok=yes; break; fi
            sleep 1
        done
        [ $ok = yes ] || kill $server
        wait $server
        cat /tmp/got";
    let out = c.run(&["--rm"], "localhost", &["sh", "-c", script]);
    assert_ok(&out, "ctr run localhost");
    assert_eq!(
        text(&out.stdout),
        "hello-lo\n",
        "what the server on 127.0.0.1:5000 received; stderr: {}",
        text(&out.stderr)
    );
    c.assert_no_leftovers(CLEANUP);
}

/// `--read-only`: the container cannot write its rootfs, yet its mount points (ctr's `/run`,
/// absent from the image) and a missing working directory exist, as runc makes them. A
/// container with CAP_SYS_ADMIN can remount its root read-write: under runc that undoes
/// `--read-only` (the flag is only the container's own mount); under husk the guest kernel,
/// hostile by assumption, can do the same, so the host refuses the write (the rootfs is
/// read-only on the host). A writable rootfs gets a missing working directory as well.
#[test]
fn a_readonly_rootfs_is_readonly_on_the_host_and_a_missing_cwd_is_made() {
    let c = Containerd::start();
    let script = "pwd; grep -c ' /run ' /proc/self/mountinfo; \
                  touch /x 2>/dev/null && echo root-written || echo root-ro; \
                  mount -o remount,rw / && touch /planted 2>&1 && echo planted";
    let flags = [
        "--rm",
        "--read-only",
        "--cwd",
        "/work/new",
        "--cap-add",
        "CAP_SYS_ADMIN",
    ];
    let out = c.run(&flags, "rofs", &["sh", "-c", script]);
    let planted = match c.runtime() {
        Runtime::Husk => "touch: /planted: Read-only file system",
        Runtime::Runc => "planted",
    };
    assert_eq!(
        text(&out.stdout),
        format!("/work/new\n1\nroot-ro\n{planted}\n"),
        "stderr: {}",
        text(&out.stderr)
    );

    let out = c.run(
        &["--rm", "--cwd", "/made/here"],
        "rwfs",
        &["sh", "-c", "pwd; touch f && echo written"],
    );
    assert_ok(&out, "ctr run --cwd");
    assert_eq!(
        text(&out.stdout),
        "/made/here\nwritten\n",
        "{}",
        text(&out.stderr)
    );
    c.assert_no_leftovers(CLEANUP);
}

/// ctr 1.6 never closes a container's stdin at EOF (DESIGN.md), so the container reads a known
/// amount; EOF propagation is tested below ctr (tests/containers.rs).
#[test]
fn stdin_is_piped_through() {
    let c = Containerd::start();
    let input: Vec<u8> = b"0123456789abcde\n"
        .iter()
        .copied()
        .cycle()
        .take(64 * 1024)
        .collect();
    let len = input.len().to_string();
    let out = c.run_with_stdin(
        &["--rm"],
        "stdin",
        &["sh", "-c", &format!("head -c {len} | cat")],
        &input,
    );
    assert_ok(&out, "ctr run -i head|cat");
    assert_eq!(out.stdout.len(), input.len(), "{}", text(&out.stderr));
    assert!(out.stdout == input, "stdin came back altered");
    c.assert_no_leftovers(CLEANUP);
}

/// `ctr run -t` needs a terminal: ctr gets a pty of ours sized 33x101 and passes the size on
/// to the container's terminal (ResizePty); the exit status comes back through tty mode too.
#[test]
fn tty_has_the_terminal_size_and_exit_status() {
    let c = Containerd::start();
    let size = nix::pty::Winsize {
        ws_row: 33,
        ws_col: 101,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size), None).expect("openpty");
    let mut args = c.run_args(&["--rm", "-t"], "tty");
    args.extend([
        "sh",
        "-c",
        // ctr sizes the terminal right after the start (ResizePty): wait for it (busybox
        // `stty size` prints nothing and exits 0 while the size is unset). ctr 1.6 may drop the
        // tail of a tty's output when the task exits at once, so the script lingers a little.
        "[ -t 0 ] && echo stdin-is-a-tty; i=0; \
         until s=$(stty size 2>/dev/null); [ -n \"$s\" ] && [ \"$s\" != '0 0' ]; do \
           i=$((i+1)); [ $i -gt 300 ] && break; sleep 0.1; done; \
         echo \"size $s\"; sleep 1; exit 3",
    ]);
    let slave = |fd: &OwnedFd| Stdio::from(fd.as_fd().try_clone_to_owned().expect("dup"));
    let mut child = c
        .ctr_command(&args)
        .stdin(slave(&pty.slave))
        .stdout(slave(&pty.slave))
        .stderr(slave(&pty.slave))
        .spawn()
        .expect("spawn ctr");
    drop(pty.slave);
    let mut master = std::fs::File::from(pty.master);
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        // EIO once the last slave fd (ctr's) is closed.
        while let Ok(n) = master.read(&mut chunk) {
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        buf
    });
    let status = wait_timeout(&mut child, CTR_TIMEOUT).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("ctr run -t did not end within {CTR_TIMEOUT:?}")
    });
    let out = text(&reader.join().expect("pty reader")).replace('\r', "");
    assert!(out.contains("stdin-is-a-tty\n"), "tty output: {out:?}");
    assert!(
        out.contains("size 33 101\n"),
        "stty size in the container: {out:?}"
    );
    assert_eq!(status.code(), Some(3), "tty output: {out:?}");
    c.assert_no_leftovers(CLEANUP);
}

/// The pids of `ctr task ps` (a `PID INFO` header, then one line per process).
fn task_ps_pids(ps: &str) -> Vec<u64> {
    let mut lines = ps.lines();
    let header = lines.next().unwrap_or_default();
    assert!(header.starts_with("PID"), "ctr task ps header: {ps}");
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("ctr task ps line {l:?}"))
        })
        .collect()
}

#[test]
fn detached_run_exec_kill_delete() {
    let c = Containerd::start();
    let id = "detached";
    run_detached(
        &c,
        &[],
        id,
        &[
            "sh",
            "-c",
            // `wait` returns when the trapped TERM arrives; until then the container is
            // exactly two processes: this shell and its sleep.
            "trap 'exit 0' TERM; sleep 100000 & wait",
        ],
    );

    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        id,
        "sh",
        "-c",
        "echo from exec; exit 5",
    ]);
    assert_eq!(text(&out.stdout), "from exec\n", "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(5));
    let added = c.wait_event("/tasks/exec-added", id, EVENT);
    assert_eq!(added.body["exec_id"], "e1");
    let exec_pid = c.wait_event("/tasks/exec-started", id, EVENT).body["pid"]
        .as_u64()
        .expect("exec-started names the exec's pid");
    assert_eq!(c.wait_exit(id, "e1", EVENT).exit_status(), 5);
    // `ctr task ps`: the task's init (the pid `ctr task ls` shows) and its sleep, nothing else
    // (the exec has exited).
    let init_pid = u64::from(c.task_pid(id).expect("ctr task ls shows the task's pid"));
    let ps = c.ctr_ok(&["task", "ps", id]);
    let pids = task_ps_pids(&ps);
    assert_eq!(pids.len(), 2, "sh and its sleep: {ps}");
    assert!(
        pids.contains(&init_pid),
        "init pid {init_pid} not listed: {ps}"
    );
    assert!(
        !pids.contains(&exec_pid),
        "the exited exec {exec_pid} listed: {ps}"
    );

    c.ctr_ok(&["task", "kill", id]);
    c.wait_task_status(id, "STOPPED", Duration::from_secs(60));
    let exit = c.wait_exit(id, "", EVENT);
    assert_eq!(
        exit.exit_status(),
        0,
        "the TERM trap exits 0: {}",
        exit.body
    );
    delete(&c, id);
    c.assert_no_leftovers(CLEANUP);
}

/// The least time the paused container is watched for a tick: fifteen periods of its loop
/// on a fast host.
const FROZEN_WATCH: Duration = Duration::from_secs(3);
/// How many of the loop's periods, as measured before the pause, the watch lasts at least
/// (a slow lab stretches the 0.2 s period).
const FROZEN_WATCH_PERIODS: u32 = 5;
/// How long the loop may take to tick after start or resume (the lab is slow).
const TICK: Duration = Duration::from_secs(60);

/// The counter a container's loop keeps in `<dir>/n` (written to a temp file and renamed, so
/// a reader never sees a torn value), read from the host; `None` before the first write.
fn host_counter(dir: &std::path::Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("n")).ok()?;
    Some(
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("counter file holds {text:?}")),
    )
}

/// Waits until the counter in `dir` exceeds `above`; fails the test after `timeout`.
fn wait_counter_above(dir: &std::path::Path, above: u64, timeout: Duration, what: &str) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let now = host_counter(dir);
        if let Some(n) = now.filter(|n| *n > above) {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the counter stayed at {now:?} (not above {above}) for {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The container's loop writes its counter into a host directory bind mounted at `/out` (an
/// exec into a paused container would be frozen too): while paused the host sees the counter
/// stand still for several of the loop's measured periods, after resume it moves again.
#[test]
fn pause_freezes_and_resume_thaws() {
    // Declared before the fixture, so it outlives the container's bind mount of it.
    let out = tempfile::Builder::new()
        .prefix("husk-pause-out-")
        .tempdir()
        .expect("temp dir for the counter");
    let c = Containerd::start();
    let id = "pausing";
    let mount = format!(
        "type=bind,src={},dst=/out,options=rbind:rw",
        out.path().display()
    );
    run_detached(&c, &["--mount", &mount], id, &[
        "sh",
        "-c",
        "i=0; while true; do i=$((i+1)); echo $i > /out/n.new; mv /out/n.new /out/n; sleep 0.2; done",
    ]);
    // Three ticks seen from the host: the loop runs, its writes reach the host, and the last
    // two give the loop's real period here (the host polls every 0.1 s).
    let first = wait_counter_above(out.path(), 0, TICK, "after start");
    let second = wait_counter_above(out.path(), first, TICK, "after start");
    let timed = Instant::now();
    let running = wait_counter_above(out.path(), second, TICK, "after start");
    let period = timed.elapsed() / u32::try_from(running - second).expect("ticks");
    let watch = FROZEN_WATCH.max(period * FROZEN_WATCH_PERIODS).min(TICK);

    c.ctr_ok(&["task", "pause", id]);
    c.wait_event("/tasks/paused", id, EVENT);
    assert_eq!(c.task_status(id).as_deref(), Some("PAUSED"));
    let paused = host_counter(out.path()).expect("counter");
    std::thread::sleep(watch);
    let still = host_counter(out.path()).expect("counter");
    eprintln!(
        "counter: {running} running (a tick every {period:?}), {paused} at pause, \
         {still} {watch:?} later"
    );
    assert_eq!(
        still, paused,
        "the counter moved while the container was paused"
    );

    c.ctr_ok(&["task", "resume", id]);
    c.wait_event("/tasks/resumed", id, EVENT);
    assert_eq!(c.task_status(id).as_deref(), Some("RUNNING"));
    let resumed_at = Instant::now();
    let resumed = wait_counter_above(out.path(), paused, TICK, "after resume");
    eprintln!(
        "counter after resume: {resumed}, {:?} after the resume",
        resumed_at.elapsed()
    );

    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]);
    c.wait_task_status(id, "STOPPED", Duration::from_secs(60));
    delete(&c, id);
    c.assert_no_leftovers(CLEANUP);
}

/// The metrics of a running task, then `ctr task kill --all`: the TERM reaches the init's child
/// too, which neither the shim nor the agent started (the init, PID 1 of its namespace without
/// a TERM handler, ignores it; its `wait` then returns the child's 128 + 15).
#[test]
fn task_metrics_report_memory_and_pids_and_kill_all_reaches_them() {
    let c = Containerd::start();
    let id = "metrics";
    run_detached(&c, &[], id, &["sh", "-c", "sleep 100000 & wait $!"]);
    let out = c.ctr_ok(&["task", "metrics", "--format", "json", id]);
    let m: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("metrics JSON ({e}): {out}"));
    // cgroup v2 (io.containerd.cgroups.v2.Metrics): pids.current, memory.usage; v1 nests
    // memory.usage.usage.
    let pids = m["pids"]["current"].as_u64().unwrap_or(0);
    let memory = m["memory"]["usage"]
        .as_u64()
        .or_else(|| m["memory"]["usage"]["usage"].as_u64())
        .unwrap_or(0);
    assert_eq!(pids, 2, "pids.current (sh and its sleep): {out}");
    assert!(memory > 0, "memory usage 0: {out}");
    c.ctr_ok(&["task", "kill", "--all", "-s", "SIGTERM", id]);
    c.wait_task_status(id, "STOPPED", Duration::from_secs(60));
    let exit = c.wait_exit(id, "", EVENT);
    assert_eq!(
        exit.exit_status(),
        128 + 15,
        "the init's wait returns its TERM-killed child's status: {}",
        exit.body
    );
    delete(&c, id);
    c.assert_no_leftovers(CLEANUP);
}

/// Two `ctr run --rm` at once: both tasks run at the same time (each in its own pod: its own
/// shim and, under husk, its own VM) until the test lets them finish.
///
/// The exec that lets a task finish writes its own pid to `/tmp/go`, and the task ends only once
/// that pid is gone from its `/proc`: a task that ended as soon as the file appeared would take
/// the exec down with its pid namespace (exit 137, under runc as under husk) whenever the exec
/// was slower to exit than the task's next look, as it once was in CI's slow lab.
#[test]
fn two_pods_run_in_parallel() {
    let c = Containerd::start();
    let ids = ["pod-a", "pod-b"];
    let outputs = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .iter()
            .map(|id| {
                let c = &c;
                s.spawn(move || {
                    let script = format!(
                        "echo start {id}; while [ ! -s /tmp/go ]; do sleep 0.2; done; \
                         while [ -e /proc/$(cat /tmp/go) ]; do sleep 0.2; done; echo end {id}"
                    );
                    c.run(&["--rm"], id, &["sh", "-c", &script])
                })
            })
            .collect();
        for id in ids {
            c.wait_task_status(id, "RUNNING", START);
        }
        assert_pod_processes(&c, 2);
        for id in ids {
            c.ctr_ok(&[
                "task",
                "exec",
                "--exec-id",
                "go",
                id,
                "/bin/sh",
                "-c",
                "echo $$ > /tmp/go",
            ]);
        }
        handles
            .into_iter()
            .map(|h| h.join().expect("ctr thread"))
            .collect::<Vec<_>>()
    });
    for (id, out) in ids.iter().zip(outputs) {
        assert_ok(&out, &format!("ctr run --rm {id}"));
        assert_eq!(text(&out.stdout), format!("start {id}\nend {id}\n"));
    }
    c.assert_no_leftovers(CLEANUP);
}

/// The pod dies under a running task: under husk, the VMM is SIGKILLed in one pod and its
/// waiter in a second (the VMM must die with it, not linger as an orphan); under runc, the
/// container's init. The task must be reported exited with a failure status, and once it is
/// deleted nothing may be left: no process, mount, socket or `/run/husk` entry.
#[test]
fn killed_pod_ends_the_task_and_leaves_nothing() {
    let c = Containerd::start();
    let victims: &[&str] = match c.runtime() {
        Runtime::Husk => &["vmm", "waiter"],
        Runtime::Runc => &["init"],
    };
    for &which in victims {
        let id = format!("victim-{which}");
        run_detached(&c, &[], &id, &["sleep", "100000"]);
        let victim = match which {
            "vmm" => pod_vmm(&c).vmm,
            "waiter" => pod_vmm(&c).waiter,
            _ => c.task_pid(&id).expect("task pid") as i32,
        };
        eprintln!("SIGKILL to the {which}, pid {victim}");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(victim),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill");
        c.wait_task_status(&id, "STOPPED", Duration::from_secs(60));
        let exit = c.wait_exit(&id, "", EVENT);
        eprintln!("reported exit: {}", exit.body);
        // runc: the SIGKILL of the init (128 + 9); husk: the status of a process lost with its VM.
        let expected = match c.runtime() {
            Runtime::Husk => u64::from(husk_shim::container::LOST_EXIT_STATUS),
            Runtime::Runc => 128 + 9,
        };
        assert_eq!(
            exit.exit_status(),
            expected,
            "a killed {which} must not look like a clean exit: {}",
            exit.body
        );
        delete(&c, &id);
        c.assert_no_leftovers(CLEANUP);
    }
}

/// A task created and killed before it starts ends as runc's does: its Wait answers 128 + 9, a
/// `/tasks/exit` is published, and its Delete reports the same status. containerd does this
/// when a start fails after the create (its cleanup kills the task and waits for it). `ctr`
/// cannot create a task without starting it, so this test calls containerd's Tasks API.
#[test]
fn a_created_task_killed_before_its_start_exits_and_is_deleted() {
    use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
    use containerd_client::services::v1::snapshots::MountsRequest;
    use containerd_client::services::v1::tasks_client::TasksClient;
    use containerd_client::services::v1::{
        CreateTaskRequest, DeleteTaskRequest, KillRequest, WaitRequest,
    };
    use containerd_client::tonic::Request;
    use containerd_client::with_namespace;

    let c = Containerd::start();
    let id = "created-killed";
    let mut args = c.run_args(&[], id);
    args.splice(0..1, ["container", "create"]);
    args.extend_from_slice(&["sleep", "100000"]);
    c.ctr_ok(&args);
    let ns = c.namespace();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (created, waited, deleted) = rt.block_on(async {
        let channel = containerd_client::connect(c.address())
            .await
            .expect("connect to containerd");
        let mounts = SnapshotsClient::new(channel.clone())
            .mounts(with_namespace!(
                MountsRequest {
                    snapshotter: c.snapshotter().into(),
                    key: id.into(),
                },
                ns
            ))
            .await
            .expect("the container's rootfs mounts")
            .into_inner()
            .mounts;
        let mut tasks = TasksClient::new(channel);
        let created = tasks
            .create(with_namespace!(
                CreateTaskRequest {
                    container_id: id.into(),
                    rootfs: mounts,
                    ..Default::default()
                },
                ns
            ))
            .await
            .expect("Create")
            .into_inner();
        let mut waiter = tasks.clone();
        let wait = tokio::spawn(async move {
            waiter
                .wait(with_namespace!(
                    WaitRequest {
                        container_id: id.into(),
                        exec_id: String::new(),
                    },
                    ns
                ))
                .await
        });
        tasks
            .kill(with_namespace!(
                KillRequest {
                    container_id: id.into(),
                    signal: 9,
                    ..Default::default()
                },
                ns
            ))
            .await
            .expect("Kill of the created task");
        let waited = tokio::time::timeout(EVENT, wait)
            .await
            .expect("Wait of the killed created task did not return")
            .expect("the waiter")
            .expect("Wait")
            .into_inner();
        let deleted = tasks
            .delete(with_namespace!(
                DeleteTaskRequest {
                    container_id: id.into(),
                },
                ns
            ))
            .await
            .expect("Delete")
            .into_inner();
        (created, waited, deleted)
    });
    assert!(created.pid > 0, "Create returned pid {}", created.pid);
    assert_eq!(waited.exit_status, 128 + 9, "Wait: {waited:?}");
    assert_eq!(deleted.exit_status, 128 + 9, "Delete: {deleted:?}");
    assert_eq!(c.wait_exit(id, "", EVENT).exit_status(), 128 + 9);
    c.ctr_ok(&["container", "delete", id]);
    c.assert_no_leftovers(CLEANUP);
}

/// `uname -r` in a container: the guest kernel's release under husk (the release in
/// `$HUSK_KERNEL`'s banner, not the host's), the host's under runc.
#[test]
fn uname_shows_whose_kernel_runs_the_container() {
    let c = Containerd::start();
    let out = c.run(&["--rm"], "uname", &["uname", "-r"]);
    assert_ok(&out, "ctr run uname -r");
    let seen = text(&out.stdout).trim().to_string();
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .expect("host release")
        .trim()
        .to_string();
    match c.runtime() {
        Runtime::Husk => {
            let guest = kernel_release(&std::fs::read(required_path("HUSK_KERNEL")).unwrap());
            assert_eq!(seen, guest, "the container runs on the guest kernel");
            assert_ne!(seen, host, "the container must not see the host kernel");
        }
        Runtime::Runc => assert_eq!(seen, host, "runc containers share the host kernel"),
    }
    c.assert_no_leftovers(CLEANUP);
}

/// The release in a kernel image's `Linux version <release> (…` banner.
fn kernel_release(image: &[u8]) -> String {
    let marker = b"Linux version ";
    let at = image
        .windows(marker.len())
        .position(|w| w == marker)
        .expect("no `Linux version` banner in $HUSK_KERNEL")
        + marker.len();
    let end = image[at..].iter().position(|b| *b == b' ').expect("banner");
    text(&image[at..at + end])
}

#[test]
fn twenty_create_delete_cycles_leave_nothing() {
    let c = Containerd::start();
    let started = Instant::now();
    for i in 0..20 {
        let t = Instant::now();
        let id = format!("cycle-{i}");
        let out = c.run(&["--rm"], &id, &["true"]);
        assert_ok(&out, &format!("cycle {i}"));
        eprintln!("cycle {i}: {:?}", t.elapsed());
    }
    eprintln!("20 cycles in {:?}", started.elapsed());
    let listed = c.ctr_ok(&["containers", "ls", "-q"]);
    assert!(listed.trim().is_empty(), "containers left: {listed}");
    c.assert_no_leftovers(CLEANUP);
}

/// Two containers of one Kubernetes-style pod (the CRI annotations: a sandbox container and a
/// container naming it): the second joins the first's shim and, under husk, its VM (the same
/// kernel boot id); the VM stays while the sandbox lives and goes when it is deleted.
#[test]
fn containers_of_one_pod_share_its_shim_and_vm() {
    let c = Containerd::start();
    let pod = "pod-s";
    let app = "pod-app";
    let sandbox_id = format!("io.kubernetes.cri.sandbox-id={pod}");
    run_detached(
        &c,
        &[
            "--annotation",
            "io.kubernetes.cri.container-type=sandbox",
            "--annotation",
            &sandbox_id,
        ],
        pod,
        &[
            "sh",
            "-c",
            "trap 'exit 0' TERM; while true; do sleep 0.2; done",
        ],
    );
    let boot_id = |id: &str, exec_id: &str| -> String {
        c.ctr_ok(&[
            "task",
            "exec",
            "--exec-id",
            exec_id,
            id,
            "cat",
            "/proc/sys/kernel/random/boot_id",
        ])
        .trim()
        .to_string()
    };
    let pod_boot = boot_id(pod, "b1");

    run_detached(
        &c,
        &[
            "--annotation",
            "io.kubernetes.cri.container-type=container",
            "--annotation",
            &sandbox_id,
        ],
        app,
        &["sh", "-c", "while true; do sleep 0.2; done"],
    );
    assert_eq!(
        boot_id(app, "b2"),
        pod_boot,
        "the container runs in the pod's kernel"
    );

    assert_pod_processes(&c, 1);

    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", app]);
    c.wait_task_status(app, "STOPPED", Duration::from_secs(60));
    delete(&c, app);
    // The pod's VM outlives its other containers.
    assert_eq!(c.task_status(pod).as_deref(), Some("RUNNING"));
    assert_eq!(boot_id(pod, "b3"), pod_boot);
    c.ctr_ok(&["task", "kill", pod]);
    c.wait_task_status(pod, "STOPPED", Duration::from_secs(60));
    assert_eq!(c.wait_exit(pod, "", EVENT).exit_status(), 0);
    delete(&c, pod);
    c.assert_no_leftovers(CLEANUP);
}

/// Annotations a hostile client might try (the Kata class of CVE-2020-27151: an annotation
/// that becomes a hypervisor or kernel argument). husk passes only allow-listed annotations to
/// the guest's spec and none to any command line.
const HOSTILE_ANNOTATIONS: [&str; 2] = [
    "io.katacontainers.config.hypervisor.kernel_params=init=/bin/sh-from-an-annotation",
    "io.husk.vmm_path=/bin/false-from-an-annotation",
];

/// The fields of `/proc/<pid>/status` named `key`, whitespace-split.
/// The husk-vmm processes of a pod: the VMM that serves the guest, PID 1 of its own PID
/// namespace, and the waiter outside that namespace, its parent and the shim's child.
struct PodVmm {
    vmm: i32,
    waiter: i32,
}

/// The one running pod's [`PodVmm`], told apart by their parentage.
fn pod_vmm(c: &Containerd) -> PodVmm {
    let left = c.leftovers();
    let pids = left.pids_of("husk-vmm");
    assert_eq!(pids.len(), 2, "one pod, a VMM and its waiter:\n{left}");
    let ppid = |pid: i32| {
        status_field(pid, None, "PPid")[0]
            .parse::<i32>()
            .expect("PPid")
    };
    let (vmm, waiter) = if ppid(pids[0]) == pids[1] {
        (pids[0], pids[1])
    } else {
        (pids[1], pids[0])
    };
    assert_eq!(ppid(vmm), waiter, "the VMM is its waiter's child:\n{left}");
    PodVmm { vmm, waiter }
}

fn status_field(pid: i32, task: Option<&str>, key: &str) -> Vec<String> {
    let path = match task {
        Some(t) => format!("/proc/{pid}/task/{t}/status"),
        None => format!("/proc/{pid}/status"),
    };
    let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("{path} has no {key}"))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// What a running pod's processes may hold: under husk, husk-vmm runs as the unprivileged
/// user with no capabilities, `no_new_privs`, a seccomp filter on every thread and a mount
/// namespace holding only its empty root (and in its own network, IPC and UTS namespaces),
/// and virtiofsd runs filtered too; under either runtime no annotation reaches a command line.
/// The jailed VMM still serves new streams (an exec).
#[test]
fn the_vmm_is_jailed_and_no_annotation_reaches_a_command_line() {
    let c = Containerd::start();
    let id = "jailed";
    let mut flags = Vec::new();
    for a in HOSTILE_ANNOTATIONS {
        flags.extend(["--annotation", a]);
    }
    run_detached(&c, &flags, id, &["sleep", "100000"]);

    let processes = c.leftovers().processes;
    for p in &processes {
        assert!(
            !p.cmdline.contains("from-an-annotation"),
            "an annotation reached a command line: {} {}",
            p.pid,
            p.cmdline
        );
    }
    if c.runtime() == Runtime::Husk {
        // husk-vmm forks into a PID namespace of its own: the serving VMM (PID 1 there) and
        // its waiter outside, both as unprivileged and as filtered.
        let PodVmm { vmm, waiter } = pod_vmm(&c);
        let tasks_of = |pid: i32| -> Vec<String> {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .expect("tasks")
                .map(|t| t.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        };
        for pid in [vmm, waiter] {
            let ps = std::process::Command::new("ps")
                .args(["-o", "user=", "-p", &pid.to_string()])
                .output()
                .expect("ps");
            assert_eq!(
                text(&ps.stdout).trim(),
                "nobody",
                "ps -o user of husk-vmm {pid}"
            );
            assert_eq!(status_field(pid, None, "Uid"), ["65534"; 4]);
            assert_eq!(status_field(pid, None, "Gid"), ["65534"; 4]);
            for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
                assert_eq!(
                    status_field(pid, None, caps),
                    ["0000000000000000"],
                    "{caps} of {pid}"
                );
            }
            assert_eq!(status_field(pid, None, "NoNewPrivs"), ["1"]);
            for t in &tasks_of(pid) {
                assert_eq!(
                    status_field(pid, Some(t), "Seccomp"),
                    ["2"],
                    "thread {t} of husk-vmm {pid}"
                );
            }
        }
        assert!(
            tasks_of(vmm).len() >= 3,
            "main, events, a vCPU: {:?}",
            tasks_of(vmm)
        );
        // Its own PID namespace, where it is PID 1.
        assert_eq!(
            status_field(vmm, None, "NSpid"),
            [vmm.to_string(), "1".to_string()],
            "husk-vmm's pids in the host's and its own PID namespace"
        );
        let mounts = std::fs::read_to_string(format!("/proc/{vmm}/mountinfo")).expect("mountinfo");
        let mounts: Vec<&str> = mounts.lines().collect();
        assert_eq!(mounts.len(), 1, "husk-vmm sees only its jail: {mounts:#?}");
        assert!(
            mounts[0].contains(" / / ro,") && mounts[0].contains(" - tmpfs "),
            "{}",
            mounts[0]
        );
        for ns in ["pid", "mnt", "net", "ipc", "uts"] {
            let theirs = std::fs::read_link(format!("/proc/{vmm}/ns/{ns}")).expect("ns");
            let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("ns");
            assert_ne!(theirs, ours, "husk-vmm shares the host's {ns} namespace");
        }
        // virtiofsd's namespace sandbox forks: the parent waits, the child serves under
        // seccomp. The serving one must have a filter on every thread.
        let filtered: Vec<(i32, Vec<Vec<String>>)> = processes
            .iter()
            .filter(|p| {
                p.cmdline
                    .split(' ')
                    .next()
                    .is_some_and(|a| a.ends_with("virtiofsd"))
            })
            .map(|p| {
                let tasks = std::fs::read_dir(format!("/proc/{}/task", p.pid))
                    .map(|d| {
                        d.map(|t| {
                            let t = t.unwrap().file_name().to_string_lossy().into_owned();
                            status_field(p.pid, Some(&t), "Seccomp")
                        })
                        .collect()
                    })
                    .unwrap_or_default();
                (p.pid, tasks)
            })
            .collect();
        assert!(
            filtered
                .iter()
                .any(|(_, tasks)| !tasks.is_empty() && tasks.iter().all(|s| s == &["2"])),
            "no virtiofsd with a seccomp filter on every thread: {filtered:?}"
        );
    }

    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        id,
        "echo",
        "still served",
    ]);
    assert_eq!(text(&out.stdout), "still served\n", "{}", text(&out.stderr));
    c.ctr_ok(&["task", "kill", "-s", "KILL", id]);
    c.wait_task_status(id, "STOPPED", Duration::from_secs(60));
    delete(&c, id);
    c.assert_no_leftovers(CLEANUP);
}
