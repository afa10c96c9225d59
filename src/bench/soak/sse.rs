//! Server-Sent Events, as far as the soak's watch streams need them.

/// Splits a Server-Sent Events byte stream into the `data` of its events (the only field the
/// soak reads: a watch event's JSON repeats its type and id).
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: Option<String>,
}

impl SseParser {
    /// Takes the next bytes of the stream; answers the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut done = Vec::new();
        for &byte in bytes {
            if byte != b'\n' {
                self.line.push(byte);
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.is_empty() {
                done.extend(self.data.take());
            } else if let Some(value) = line.strip_prefix(b"data:") {
                let value = String::from_utf8_lossy(value.strip_prefix(b" ").unwrap_or(value));
                match &mut self.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(&value);
                    }
                    None => self.data = Some(value.into_owned()),
                }
            }
            // `event:`, `id:`, `retry:` and `:` comments (the keep-alives) are not needed.
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_are_split_across_chunks_and_keep_alives_skipped() {
        let mut parser = SseParser::default();
        assert!(
            parser
                .push(b": keep-alive\n\nevent: current\nid: 4\ndata: {\"a\"")
                .is_empty()
        );
        assert_eq!(
            parser.push(b":1}\r\n\r\ndata: x\ndata: y\n"),
            vec!["{\"a\":1}"]
        );
        assert_eq!(parser.push(b"\n"), vec!["x\ny"]);
        assert!(parser.push(b"\n\n").is_empty(), "no data: no event");
    }
}
