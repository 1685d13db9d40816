//! glibc's allocator on a filtered thread: the event loop's filter forbids `openat`, and
//! glibc's `shrink_heap` opens `/proc/sys/vm/overcommit_memory` the first time a thread's own
//! arena gives memory back. That killed husk-vmm in a 10 MiB stdin round trip.
//!
//! Each case runs in a fresh process (this test re-executes itself), because the file is read
//! once per process and a forked child would inherit the harness's arenas. Without
//! `single_malloc_arena` the attack must kill (so the test can fail); with it, the same frees
//! must pass. Its own `main` (no libtest harness): libtest's threads would create arenas
//! first.

use std::process::Command;

use husk_vmm::seccomp::{self, SeccompMode, ThreadKind};

/// What the event loop does in a bulk stream, to the allocator: many buffers below the mmap
/// threshold, all freed, so the top of the thread's arena grows past the trim threshold.
fn churn() {
    for _ in 0..4 {
        let buffers: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 64 * 1024]).collect();
        for buffer in buffers.into_iter().rev() {
            std::hint::black_box(&buffer);
            drop(buffer);
        }
    }
}

/// A child: optionally husk-vmm's allocator setting, then a thread under the event loop's
/// filter that churns its heap.
fn child(defended: bool) -> ! {
    if defended {
        seccomp::single_malloc_arena().expect("mallopt");
    }
    seccomp::install_sigsys_handler().expect("SIGSYS handler");
    let program = seccomp::program(ThreadKind::Events, SeccompMode::Kill, std::process::id())
        .expect("compile")
        .expect("a filter");
    std::thread::spawn(move || {
        // The thread's first allocation (its arena) comes before the filter, as in husk-vmm.
        std::hint::black_box(vec![0u8; 4096]);
        seccomp::install(ThreadKind::Events, Some(&program)).expect("install");
        churn();
    })
    .join()
    .expect("the filtered thread");
    std::process::exit(0)
}

fn run(mode: &str) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .arg(mode)
        .output()
        .expect("run the child")
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("--child-default") => child(false),
        Some("--child-husk") => child(true),
        _ => {}
    }
    use std::os::unix::process::ExitStatusExt;

    // The attack, without the defence: glibc's openat under the filter kills the process,
    // and the handler names the syscall and where it was made.
    let attack = run("--child-default");
    let stderr = String::from_utf8_lossy(&attack.stderr);
    assert_eq!(
        attack.status.signal(),
        Some(libc::SIGSYS),
        "glibc's default arenas should open a file under the filter here (is this glibc?): \
         {:?}\n{stderr}",
        attack.status
    );
    assert!(
        stderr.contains("the event loop thread made syscall 257 at 0x")
            && stderr.contains("libc's write at 0x"),
        "the handler's message: {stderr}"
    );
    println!("malloc under the event loop's filter: glibc's default arenas die of SIGSYS (openat)");

    // The defence: husk-vmm's setting, the same frees, no file opened.
    let defended = run("--child-husk");
    assert_eq!(
        defended.status.code(),
        Some(0),
        "husk-vmm's single arena still died under the filter: {:?}\n{}",
        defended.status,
        String::from_utf8_lossy(&defended.stderr)
    );
    println!("malloc under the event loop's filter: one arena survives the same frees");
}
