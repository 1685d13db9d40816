//! The husk agent protocol: `agent.proto` and its generated async ttrpc client and server.
//!
//! This crate is the one definition of the host ↔ guest protocol; both the shim
//! (`husk_shim::agent`) and the agent (`husk-agent`) use it, never hand-copied types.
//! Messages live in [`agent`], clients/service traits/registration helpers in [`agent_ttrpc`].
#![warn(missing_docs)]

include!(concat!(env!("OUT_DIR"), "/protos/generated.rs"));

pub mod stdio;

/// The guest vsock port the agent's ttrpc server listens on (docs/contracts.md).
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Protocol revision of `agent.proto`, reported in `VersionResponse.api_revision`.
/// Bump it whenever an RPC or a field is added.
pub const API_REVISION: u32 = 4;

/// The guest vsock port of the agent's stdio streams (docs/contracts.md, "Containers").
pub const STDIO_VSOCK_PORT: u32 = 1025;

pub use agent_ttrpc::{create_agent, create_health, Agent, AgentClient, Health, HealthClient};
