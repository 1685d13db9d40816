//! husk shim library: the containerd shim v2 for husk (`containerd-shim-husk-v2`) and the
//! host-side agent client.
#![warn(missing_docs)]

pub mod agent;
pub mod cgroup;
pub mod config;
pub mod container;
pub mod error;
pub mod events;
pub mod io;
pub mod mount;
pub mod network;
pub mod sandbox;
pub mod service;
pub mod spec;
pub mod task;
pub mod vmm;
