//! Server-sent events as the three streaming APIs send them: `event:` and
//! `data:` lines, an event ending at a blank line, comments starting with
//! `:`. Fed bytes as they arrive, in chunks cut anywhere.

/// One event: its `event:` name (if any) and its `data:` lines joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, if sent.
    pub name: Option<String>,
    /// The `data:` fields, joined with `\n`.
    pub data: String,
}

/// The longest event Apex accepts (a whole answer's text fits many times
/// over): a server that never ends an event cannot exhaust memory.
pub const MAX_EVENT_BYTES: usize = 64 * 1024 * 1024;

/// An incremental SSE parser.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    name: Option<String>,
    data: String,
    has_data: bool,
    pending: usize,
}

impl SseParser {
    /// Feeds a chunk; returns the events it completes, or an error for an
    /// event larger than [`MAX_EVENT_BYTES`] or a line that is not UTF-8.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, String> {
        let mut events = Vec::new();
        for &byte in chunk {
            if byte == b'\n' {
                let mut line = std::mem::take(&mut self.line);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                let line = String::from_utf8(line)
                    .map_err(|_| "a stream line is not valid UTF-8".to_owned())?;
                if let Some(event) = self.line_done(&line) {
                    events.push(event);
                }
            } else {
                self.line.push(byte);
                self.pending += 1;
                if self.pending > MAX_EVENT_BYTES {
                    return Err(format!(
                        "a stream event is longer than {MAX_EVENT_BYTES} bytes"
                    ));
                }
            }
        }
        Ok(events)
    }

    /// The event still open when the stream ends (a server may omit the
    /// final blank line).
    pub fn finish(&mut self) -> Option<SseEvent> {
        let line = String::from_utf8_lossy(&std::mem::take(&mut self.line)).into_owned();
        if !line.is_empty()
            && let Some(event) = self.line_done(line.trim_end_matches('\r'))
        {
            return Some(event);
        }
        self.dispatch()
    }

    fn line_done(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => self.name = Some(value.to_owned()),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        self.pending = 0;
        let name = self.name.take();
        if !self.has_data {
            return None;
        }
        self.has_data = false;
        Some(SseEvent {
            name,
            data: std::mem::take(&mut self.data),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_survive_any_chunking() {
        let text = "event: message_start\ndata: {\"a\":1}\n\n: ping\r\ndata: one\r\ndata: two\r\n\r\ndata: [DONE]\n\n";
        let expected = vec![
            SseEvent {
                name: Some("message_start".into()),
                data: "{\"a\":1}".into(),
            },
            SseEvent {
                name: None,
                data: "one\ntwo".into(),
            },
            SseEvent {
                name: None,
                data: "[DONE]".into(),
            },
        ];
        for size in 1..text.len() {
            let mut parser = SseParser::default();
            let mut events = Vec::new();
            for chunk in text.as_bytes().chunks(size) {
                events.extend(parser.feed(chunk).unwrap());
            }
            assert_eq!(parser.finish(), None);
            assert_eq!(events, expected, "chunks of {size}");
        }
    }

    #[test]
    fn an_unterminated_last_event_is_kept_and_huge_ones_refused() {
        let mut parser = SseParser::default();
        assert!(parser.feed(b"data: tail").unwrap().is_empty());
        assert_eq!(parser.finish().unwrap().data, "tail");
        let mut parser = SseParser::default();
        let big = vec![b'x'; 1024 * 1024];
        let mut failed = false;
        for _ in 0..(MAX_EVENT_BYTES / big.len() + 2) {
            if parser.feed(&big).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed);
    }
}
