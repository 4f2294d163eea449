//! Finds where a chunked message body ends, so the fast path can pass the chunks through
//! unchanged (RFC 9112 §7.1) and still know when the upstream connection is free again; and,
//! for a body going on to an HTTP/2 client, where the chunks' data lie. Sans IO: fed whatever
//! bytes have arrived, it says how many belong to the body.

use std::ops::Range;

/// Chunk sizes above this are refused: no real body needs them, and it keeps the arithmetic
/// far from overflow.
const MAX_CHUNK: u64 = 1 << 40;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid chunked encoding: {0}")]
pub struct ChunkError(&'static str);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Hex digits of a chunk size; `digits` counts them.
    Size,
    /// A chunk extension, skipped up to its CR.
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// The start of a trailer line, or the final CRLF.
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// Where a chunked body stands.
#[derive(Debug)]
pub struct Chunked {
    state: State,
    size: u64,
    digits: u8,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            state: State::Size,
            size: 0,
            digits: 0,
        }
    }
}

impl Chunked {
    /// One byte of a chunk-size line: a hex digit, or what ends the size.
    fn size_byte(&mut self, b: u8) -> Result<(), ChunkError> {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ if self.digits == 0 => return Err(ChunkError("missing chunk size")),
            b';' | b' ' | b'\t' => {
                self.state = State::Extension;
                return Ok(());
            }
            b'\r' => {
                self.state = State::SizeLf;
                return Ok(());
            }
            _ => return Err(ChunkError("bad chunk size")),
        };
        self.size = self.size * 16 + u64::from(digit);
        self.digits = self.digits.saturating_add(1);
        if self.size > MAX_CHUNK {
            return Err(ChunkError("chunk too large"));
        }
        Ok(())
    }

    /// Scans `data`, the next bytes of the body. Returns how many of them belong to the body
    /// and whether the body (last chunk and trailers) is complete; bytes after the end are not
    /// consumed.
    pub fn scan(&mut self, data: &[u8]) -> Result<(usize, bool), ChunkError> {
        self.decode(data, |_| {})
    }

    /// [`Chunked::scan`], also telling `on_data` where the chunks' data lie in `data` (for a
    /// body that leaves HTTP/1.1 and must lose its chunk framing), in order.
    pub fn decode(
        &mut self,
        data: &[u8],
        mut on_data: impl FnMut(Range<usize>),
    ) -> Result<(usize, bool), ChunkError> {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match self.state {
                State::Size => self.size_byte(b)?,
                State::Extension => match b {
                    b'\r' => self.state = State::SizeLf,
                    b'\n' => return Err(ChunkError("bare LF in chunk extension")),
                    _ => {}
                },
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError("expected LF after chunk size"));
                    }
                    self.digits = 0;
                    self.state = if self.size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::Data => {
                    let take =
                        (data.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    self.size -= take as u64;
                    on_data(i..i + take);
                    i += take;
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError("chunk data longer than its size"));
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError("expected LF after chunk data"));
                    }
                    self.state = State::Size;
                }
                State::TrailerStart => {
                    self.state = if b == b'\r' {
                        State::EndLf
                    } else {
                        State::TrailerLine
                    };
                }
                State::TrailerLine => match b {
                    b'\r' => self.state = State::TrailerLf,
                    b'\n' => return Err(ChunkError("bare LF in trailer")),
                    _ => {}
                },
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkError("expected LF after trailer"));
                    }
                    self.state = State::TrailerStart;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(ChunkError("expected LF at the end of the body"));
                    }
                    self.state = State::Done;
                    return Ok((i + 1, true));
                }
                State::Done => return Ok((i, true)),
            }
            i += 1;
        }
        Ok((i, self.state == State::Done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(body: &[u8]) -> Result<(usize, bool), ChunkError> {
        Chunked::default().scan(body)
    }

    #[test]
    fn finds_the_end_of_a_body_and_leaves_what_follows() {
        let body = b"3\r\nabc\r\n10;name=v\r\n0123456789abcdef\r\n0\r\n\r\nHTTP/1.1";
        assert_eq!(whole(body), Ok((body.len() - 8, true)));
    }

    #[test]
    fn trailers_belong_to_the_body() {
        let body = b"1\r\nx\r\n0\r\nx-sum: 1\r\nx-more: 2\r\n\r\n";
        assert_eq!(whole(body), Ok((body.len(), true)));
    }

    #[test]
    fn byte_by_byte_is_the_same_as_at_once() {
        let body = b"A\r\n0123456789\r\n0\r\nt: v\r\n\r\n";
        let mut c = Chunked::default();
        for (i, b) in body.iter().enumerate() {
            let (n, done) = c.scan(std::slice::from_ref(b)).expect("valid");
            assert_eq!(n, 1);
            assert_eq!(done, i == body.len() - 1, "at byte {i}");
        }
    }

    #[test]
    fn decoding_gives_the_data_in_every_split() {
        let body = b"3\r\nabc\r\n10;name=v\r\n0123456789abcdef\r\n0\r\nt: v\r\n\r\n";
        for split in 0..=body.len() {
            let mut c = Chunked::default();
            let mut data = Vec::new();
            let mut done = false;
            for part in [&body[..split], &body[split..]] {
                let (n, d) = c
                    .decode(part, |r| data.extend_from_slice(&part[r]))
                    .expect("valid");
                assert_eq!(n, part.len());
                done = d;
            }
            assert!(done);
            assert_eq!(data, b"abc0123456789abcdef", "split at {split}");
        }
    }

    #[test]
    fn an_incomplete_body_is_not_done() {
        assert_eq!(whole(b"5\r\nab"), Ok((5, false)));
        assert_eq!(whole(b"0\r\n"), Ok((3, false)));
        assert_eq!(whole(b"0\r\n\r"), Ok((4, false)));
    }

    #[test]
    fn garbage_is_an_error() {
        for bad in [
            &b"\r\n"[..],
            b"zz\r\n",
            b"3\nabc",
            b"3\r\nabcd\r\n",
            b"3\r\nabc\n",
            b"1;ext\nx",
            b"0\r\nt\nx",
            b"0\r\n\rx",
            b"ffffffffffffffffff\r\n",
        ] {
            assert!(whole(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
