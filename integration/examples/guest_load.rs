//! A lab experiment, not a test: does the lab's L2 guest die under load that never touches
//! husk-vmm's vsock device? (issue 8: "tell the lab's faults from husk-vmm's").
//!
//! It boots one pod as the bulk component test does (256 MiB, one vCPU, virtio-fs share) and
//! runs one container for `SECONDS` (default 30) of load of kind `LOAD`:
//! - `stdout`: `yes | head -c 10M` to the container's stdout, again and again: the bulk test's
//!   guest→host stream through husk-vmm's vsock device (the host reads and checks the bytes);
//! - `cpu`: the same `yes | head -c 10M`, piped into `md5sum` inside the guest: the same guest
//!   processes and pipes, no device traffic at all;
//! - `fs`: the same bytes written to a file on the virtio-fs share and read back: heavy device
//!   traffic and interrupts, but the data moves between the guest and virtiofsd (vhost-user),
//!   and husk-vmm only relays the queue notifications.
//!
//! - `stdout100`: one container writing 100 MiB to stdout, exactly the bulk test's `c3`;
//! - `bulkseq`: the bulk test's sequence: `echo`, a 10 MiB stdin round trip through `cat`, then
//!   the 100 MiB of `stdout100`.
//!
//! The last two run once (no time loop). It prints `LOAD DONE <kind> <rounds> rounds in <s>` and exits 0, or panics with the VMM log
//! when the guest dies. Run it in the lab through `cargo xtask soak guest-load:<kind>`.

use std::time::{Duration, Instant};

use husk_integration::pod::{spec, Pod};

fn main() {
    let kind = std::env::var("LOAD").unwrap_or_else(|_| "stdout".into());
    let seconds: u64 = std::env::var("SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    if kind == "stdout100" || kind == "bulkseq" {
        return bulk(&kind);
    }
    let script = match kind.as_str() {
        "stdout" => "yes 0123456789abcde | head -c 10485760",
        "cpu" => "yes 0123456789abcde | head -c 10485760 | md5sum",
        "fs" => {
            "yes 0123456789abcde | head -c 10485760 > /mnt/load.bin && md5sum /mnt/load.bin \
             && rm /mnt/load.bin"
        }
        other => panic!("LOAD={other:?}: use stdout, cpu or fs"),
    };
    let rt = husk_integration::experiment_runtime();
    rt.block_on(async {
        let pod = Pod::boot(256).await;
        let mut s = spec(&["sh", "-c", script]);
        if kind == "fs" {
            s["mounts"]
                .as_array_mut()
                .expect("mounts")
                .push(serde_json::json!({
                "destination": "/mnt", "type": "bind", "source": "/run/husk/shared/vol",
                "options": ["rbind", "rw"]}));
        }
        let start = Instant::now();
        let mut rounds = 0u32;
        while start.elapsed() < Duration::from_secs(seconds) {
            // The share has rootfs links c1..c9; two alternate.
            let id = format!("c{}", 1 + rounds % 2);
            let o = pod.run(&id, &s, None).await;
            assert_eq!(
                o.status,
                0,
                "{kind} round {rounds}: stderr {}",
                String::from_utf8_lossy(&o.stderr)
            );
            match kind.as_str() {
                "stdout" => assert_eq!(o.stdout.len(), 10 << 20, "round {rounds}"),
                _ => assert!(
                    String::from_utf8_lossy(&o.stdout).contains("  "),
                    "round {rounds}: no md5sum: {:?}",
                    String::from_utf8_lossy(&o.stdout)
                ),
            }
            rounds += 1;
        }
        println!(
            "LOAD DONE {kind} {rounds} rounds in {:.1} s",
            start.elapsed().as_secs_f64()
        );
        pod.shutdown().await;
    });
}

/// The bulk test's 100 MiB stream, alone or after its `echo` and 10 MiB stdin round trip.
fn bulk(kind: &str) {
    let rt = husk_integration::experiment_runtime();
    rt.block_on(async {
        let pod = Pod::boot(256).await;
        let start = Instant::now();
        if kind == "bulkseq" {
            let o = pod.run("c1", &spec(&["sh", "-c", "echo out"]), None).await;
            assert_eq!(o.stdout, b"out\n");
            let input: Vec<u8> = (0..10 * 1024 * 1024u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
                .collect();
            let o = pod.run("c2", &spec(&["cat"]), Some(input.clone())).await;
            assert!(o.stdout == input, "cat returned {} bytes", o.stdout.len());
        }
        let len = 100 << 20;
        let script = format!("yes 0123456789abcde | head -c {len}");
        let o = pod.run("c3", &spec(&["sh", "-c", &script]), None).await;
        assert_eq!(o.status, 0);
        assert_eq!(o.stdout.len(), len);
        println!(
            "LOAD DONE {kind} 1 rounds in {:.1} s",
            start.elapsed().as_secs_f64()
        );
        pod.shutdown().await;
    });
}
