//! Generates the protobuf messages and the async ttrpc client/server for `agent.proto`.
//!
//! Pure Rust (ttrpc-codegen's parser): no `protoc` binary is needed on the build host.

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() -> std::io::Result<()> {
    const PROTO: &str = "agent.proto";
    println!("cargo:rerun-if-changed={PROTO}");

    let out_dir = std::path::PathBuf::from(
        std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR for build scripts"),
    )
    .join("protos");
    std::fs::create_dir_all(&out_dir)?;

    Codegen::new()
        .out_dir(&out_dir)
        .input(PROTO)
        .include(".")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()?;

    // The generated files carry inner attributes (`#![allow(..)]`), which `include!` cannot
    // take, so lib.rs includes this wrapper that mounts them as file modules by path.
    let module = |name: &str, doc: &str| {
        let path = out_dir.join(format!("{name}.rs"));
        format!(
            "#[doc = {doc:?}]\n#[allow(missing_debug_implementations)]\n#[path = {path:?}]\npub mod {name};\n"
        )
    };
    let wrapper = module(
        "agent",
        "Protobuf messages of `agent.proto` (package `husk.agent.v1`).",
    ) + &module(
        "agent_ttrpc",
        "Async ttrpc clients, service traits and `create_*` registration helpers.",
    );
    std::fs::write(out_dir.join("generated.rs"), wrapper)
}
