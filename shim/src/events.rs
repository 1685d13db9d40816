//! Task events to containerd (`/tasks/create`, `/tasks/exit`, …) through the shim crate's
//! publisher, which queues and retries them on containerd's ttrpc events service.
//!
//! A publisher is optional so the Task service can run without containerd in tests;
//! publishing failures are logged, never returned: an event is a notification, and the task
//! operation that caused it has already happened.

use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::MessageDyn;
use tracing::{debug, warn};

/// Where events go.
pub struct Events {
    publisher: Option<RemotePublisher>,
    namespace: String,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("connected", &self.publisher.is_some())
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl Events {
    /// Events for containerd namespace `namespace`; `None` drops them (tests).
    pub fn new(publisher: Option<RemotePublisher>, namespace: &str) -> Self {
        Self {
            publisher,
            namespace: namespace.to_owned(),
        }
    }

    /// Publishes `event` on `topic`.
    pub async fn publish(&self, topic: &str, event: impl MessageDyn) {
        let Some(publisher) = &self.publisher else {
            debug!(topic, "event dropped (no publisher)");
            return;
        };
        let ctx = containerd_shim::Context::default();
        if let Err(e) = publisher
            .publish(ctx, topic, &self.namespace, Box::new(event))
            .await
        {
            warn!(topic, error = %e, "cannot publish event");
        }
    }
}

/// The current time as a protobuf timestamp.
pub fn now() -> Timestamp {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
        ..Default::default()
    }
}
