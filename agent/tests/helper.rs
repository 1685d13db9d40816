//! The container helper as a real process: `husk-agent __container-helper` answers every
//! request with exactly one reply line on its stdout, also when the request is unusable.
//! (Making containers needs a guest; `integration/tests/containers.rs` covers that.)

use std::io::Write;
use std::process::{Command, Stdio};

/// Runs the helper with `request` on stdin and returns its stdout and exit code.
fn helper(request: &[u8]) -> (String, Option<i32>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_husk-agent"))
        .arg("__container-helper")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the helper");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(request)
        .expect("write the request");
    let out = child.wait_with_output().expect("helper output");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code(),
    )
}

fn request(stdio: [i32; 3]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "id": "c1",
        "op": {"Create": {"bundle": "/nonexistent/bundle"}},
        "stdio": stdio,
        "seccomp": [],
    }))
    .unwrap()
}

fn failure(out: &str) -> String {
    assert!(out.ends_with('\n'), "one reply line: {out:?}");
    assert_eq!(out.lines().count(), 1, "one reply line: {out:?}");
    let v: serde_json::Value = serde_json::from_str(out).expect("reply JSON");
    v["Failed"]
        .as_str()
        .unwrap_or_else(|| panic!("a failure reply: {out:?}"))
        .to_owned()
}

#[test]
fn malformed_requests_get_a_failure_reply() {
    let (out, code) = helper(b"{\"id\":");
    assert!(failure(&out).contains("invalid request"), "{out}");
    assert_eq!(code, Some(0));
}

#[test]
fn stdio_fds_must_be_inherited_and_not_the_helpers_own() {
    let (out, _) = helper(&request([0, 1, 2]));
    assert!(failure(&out).contains("collides"), "{out}");
    let (out, _) = helper(&request([900, 901, 902]));
    assert!(failure(&out).contains("stdio fd 900"), "{out}");
}
