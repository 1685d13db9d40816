//! husk shim library.
