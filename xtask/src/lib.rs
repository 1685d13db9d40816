//! xtask's library: every subcommand's implementation, so commands can call each other
//! (`test` boots the lab, `bench` needs the guest artifacts) and `main.rs` stays a thin
//! dispatcher.
#![warn(missing_docs)]

pub mod bench;
pub mod boot_check;
pub mod cache;
pub mod cpio;
pub mod demo;
pub mod fuzz;
pub mod guest;
pub mod image;
pub mod install;
pub mod lab;
pub mod process;
pub mod setup;
pub mod soak;
pub mod test;
