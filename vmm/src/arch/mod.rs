//! Architecture-specific parts of the VMM. husk only runs on x86_64 hosts.

pub mod x86_64;
