//! Reads the lab's serial console: separates the lab init's marker lines from the
//! command's own output.
//!
//! The lab init prints `HUSK-LAB-<EVENT> <nonce> [detail]` lines on the console, where
//! the nonce is fresh for every launch: the command's output cannot fake a marker unless
//! it knows the nonce, so a test that prints `HUSK-LAB-EXIT 0` cannot hide its failure.
//! Everything that is not a marker of this launch is the command's output.

/// The prefix of every marker line.
pub const MARKER_PREFIX: &str = "HUSK-LAB-";

/// One marker printed by the lab init.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    /// `/dev/kvm` exists (with nested paging where the run asked for it).
    KvmReady,
    /// The command is about to start; from here on the console is its output.
    Start,
    /// The command exited with this status.
    Exit(i32),
    /// The lab init gave up; the text says why.
    Fail(String),
}

/// A console line, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A marker of this launch.
    Marker(Marker),
    /// Anything else, with the serial line's trailing `\r` removed.
    Output(String),
}

/// Classifies one console line (without its `\n`) for the launch with `nonce`.
pub fn classify(raw: &str, nonce: &str) -> Line {
    let line = raw.trim_end_matches('\r');
    match parse_marker(line, nonce) {
        Some(marker) => Line::Marker(marker),
        None => Line::Output(line.to_string()),
    }
}

fn parse_marker(line: &str, nonce: &str) -> Option<Marker> {
    // Kernel messages can share a line with a marker; only a marker at the very start
    // of a line counts.
    let rest = line.strip_prefix(MARKER_PREFIX)?;
    let (event, rest) = rest.split_once(' ')?;
    let (got_nonce, detail) = match rest.split_once(' ') {
        Some((n, d)) => (n, d.trim()),
        None => (rest, ""),
    };
    if got_nonce != nonce {
        return None;
    }
    match (event, detail) {
        ("KVM", "") => Some(Marker::KvmReady),
        ("START", "") => Some(Marker::Start),
        ("EXIT", code) => code.parse().ok().map(Marker::Exit),
        ("FAIL", why) => Some(Marker::Fail(why.to_string())),
        _ => None,
    }
}

/// Splits a byte stream into lines; bytes that are not UTF-8 are replaced.
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Feeds bytes, returning every line completed by them.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                lines.push(String::from_utf8_lossy(&self.pending).into_owned());
                self.pending.clear();
            } else {
                self.pending.push(b);
            }
        }
        lines
    }

    /// The unterminated rest, at end of stream.
    pub fn finish(&mut self) -> Option<String> {
        if self.pending.is_empty() {
            return None;
        }
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        Some(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: &str = "3f9a";

    #[test]
    fn parses_markers_of_this_launch() {
        assert_eq!(
            classify("HUSK-LAB-KVM 3f9a\r", N),
            Line::Marker(Marker::KvmReady)
        );
        assert_eq!(
            classify("HUSK-LAB-START 3f9a", N),
            Line::Marker(Marker::Start)
        );
        assert_eq!(
            classify("HUSK-LAB-EXIT 3f9a 3\r", N),
            Line::Marker(Marker::Exit(3))
        );
        assert_eq!(
            classify("HUSK-LAB-EXIT 3f9a 0", N),
            Line::Marker(Marker::Exit(0))
        );
        assert_eq!(
            classify("HUSK-LAB-FAIL 3f9a kvm_amd did not load", N),
            Line::Marker(Marker::Fail("kvm_amd did not load".into()))
        );
    }

    #[test]
    fn other_lines_are_output() {
        // Wrong nonce: a command cannot fake the marker.
        assert_eq!(
            classify("HUSK-LAB-EXIT 0000 0", N),
            Line::Output("HUSK-LAB-EXIT 0000 0".into())
        );
        // Not at the start of the line, malformed status, unknown event.
        for s in [
            "x HUSK-LAB-EXIT 3f9a 0",
            "HUSK-LAB-EXIT 3f9a zero",
            "HUSK-LAB-EXIT",
            "HUSK-LAB-BOOM 3f9a",
        ] {
            assert_eq!(classify(s, N), Line::Output(s.into()));
        }
        assert_eq!(classify("hello\r", N), Line::Output("hello".into()));
    }

    #[test]
    fn splits_lines_across_chunks() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"ab"), Vec::<String>::new());
        assert_eq!(
            s.push(b"c\r\nde\nf"),
            vec!["abc\r".to_string(), "de".to_string()]
        );
        assert_eq!(s.finish(), Some("f".to_string()));
        assert_eq!(s.finish(), None);
    }
}
