//! husk-vmm library.
