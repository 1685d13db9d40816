//! containerd's events as `ctr events` prints them, so tests can assert on what containerd
//! was told (TaskCreate, TaskStart, TaskExit with its status, TaskExecAdded, TaskPaused, …).

/// One line of `ctr events`: `<date> <time> <zone> UTC <namespace> <topic> <json>`.
#[derive(Debug, Clone)]
pub struct Event {
    /// The containerd namespace.
    pub namespace: String,
    /// The topic, e.g. `/tasks/exit`.
    pub topic: String,
    /// The event, as containerd's JSON.
    pub body: serde_json::Value,
}

impl Event {
    /// Parses one line of `ctr events`.
    pub fn parse(line: &str) -> Option<Event> {
        let json_at = line.find('{')?;
        let head: Vec<&str> = line[..json_at].split_whitespace().collect();
        let topic = head.iter().rposition(|w| w.starts_with('/'))?;
        Some(Event {
            namespace: head.get(topic.checked_sub(1)?)?.to_string(),
            topic: head[topic].to_string(),
            body: serde_json::from_str(&line[json_at..]).ok()?,
        })
    }

    /// The container the event is about (`container_id`, or `id` for container events).
    pub fn container_id(&self) -> Option<&str> {
        self.body["container_id"]
            .as_str()
            .or_else(|| self.body["id"].as_str())
    }

    /// `exit_status` of `/tasks/exit` and `/tasks/delete` (absent when 0).
    pub fn exit_status(&self) -> u64 {
        self.body["exit_status"].as_u64().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctr_event_lines_are_parsed() {
        let line = "2026-11-25 06:52:59.191092719 +0000 UTC husk-test /tasks/exit \
                    {\"container_id\":\"e1\",\"id\":\"e1\",\"pid\":20040,\"exit_status\":3}";
        let e = Event::parse(line).unwrap();
        assert_eq!(e.namespace, "husk-test");
        assert_eq!(e.topic, "/tasks/exit");
        assert_eq!(e.container_id(), Some("e1"));
        assert_eq!(e.exit_status(), 3);
        let e = Event::parse("2026-11-25 06:52:59 +0000 UTC ns /containers/delete {\"id\":\"x\"}")
            .unwrap();
        assert_eq!((e.container_id(), e.exit_status()), (Some("x"), 0));
        assert!(Event::parse("garbage").is_none());
    }
}
