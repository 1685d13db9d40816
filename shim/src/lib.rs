//! husk shim library: the containerd shim v2 for husk and the host-side agent client.
#![warn(missing_docs)]

pub mod agent;
