//! Agent API.
