//! Shared helpers for husk tests.
