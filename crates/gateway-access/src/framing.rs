//! Ambiguous HTTP/1.1 framing, caught below hyper.
//!
//! hyper resolves two request-smuggling shapes instead of refusing them, and removes the
//! evidence before a service sees the request: with both `Content-Length` and
//! `Transfer-Encoding` it drops the length, reads the body as chunked and closes the connection
//! afterwards; with the same `Content-Length` twice it keeps one. (Differing lengths, a
//! `Transfer-Encoding` whose last coding is not `chunked`, or one in HTTP/1.0, it answers 400
//! itself.) A proxy in front of us may have framed such a request the other way, so we refuse
//! it: [`FramingGuard`] wraps the connection's reads, follows the HTTP/1.1 message boundaries
//! (heads parsed by `httparse`, the parser hyper uses; bodies skipped by their length or
//! chunks), and marks the first ambiguous request in a [`FramingVerdict`] the server consults
//! before serving each request: that request gets 400 and the connection is closed, so nothing
//! after it is ever read as a request.
//!
//! The guard only looks: every byte reaches hyper unchanged. When it cannot follow the stream
//! (a head hyper will refuse anyway, an h2 preface, an upgrade) it stops looking.

use pin_project_lite::pin_project;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The headers one request may carry for `httparse`; hyper's own default is 100.
const MAX_HEADERS: usize = 128;

/// Shared by a connection's guard and the service serving its requests.
#[derive(Debug)]
pub struct FramingVerdict {
    /// Index of the first request whose framing is ambiguous; `u64::MAX` while there is none.
    ambiguous_from: AtomicU64,
    /// Requests the service has been asked to serve on this connection.
    served: AtomicU64,
}

impl Default for FramingVerdict {
    fn default() -> Self {
        Self {
            ambiguous_from: AtomicU64::new(u64::MAX),
            served: AtomicU64::new(0),
        }
    }
}

impl FramingVerdict {
    /// Called once per request, in order: `false` means answer 400 and close. HTTP/1.1 serves a
    /// connection's requests one after another, and the guard saw each head before hyper
    /// could parse it, so the verdict for this request is already known.
    pub fn admit(&self) -> bool {
        let index = self.served.fetch_add(1, Ordering::AcqRel);
        index < self.ambiguous_from.load(Ordering::Acquire)
    }

    fn mark(&self, index: u64) {
        self.ambiguous_from.fetch_min(index, Ordering::AcqRel);
    }
}

pin_project! {
    /// A connection's reads, watched for ambiguous framing (see the module docs).
    pub struct FramingGuard<IO> {
        #[pin]
        io: IO,
        tracker: Tracker,
    }
}

impl<IO> FramingGuard<IO> {
    /// `max_head_bytes` bounds what the guard buffers of one head (hyper refuses longer ones).
    pub fn new(io: IO, verdict: Arc<FramingVerdict>, max_head_bytes: usize) -> Self {
        Self {
            io,
            tracker: Tracker {
                state: State::Head(Vec::new()),
                verdict,
                index: 0,
                max_head_bytes,
            },
        }
    }
}

impl<IO: AsyncRead> AsyncRead for FramingGuard<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let result = this.io.poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &result {
            this.tracker.feed(&buf.filled()[before..]);
        }
        result
    }
}

impl<IO: AsyncWrite> AsyncWrite for FramingGuard<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[derive(Debug)]
enum State {
    /// Collecting a request head.
    Head(Vec<u8>),
    /// Skipping a body of known length.
    Body(u64),
    /// Collecting a chunk-size line.
    ChunkSize(Vec<u8>),
    /// Skipping chunk data, then its CRLF.
    ChunkData(u64),
    /// Skipping to the end of the line after chunk data.
    ChunkEnd,
    /// Collecting trailer lines up to the empty one.
    Trailers(Vec<u8>),
    /// No longer following the stream.
    Done,
}

#[derive(Debug)]
struct Tracker {
    state: State,
    verdict: Arc<FramingVerdict>,
    /// Index of the request whose head or body is being read.
    index: u64,
    max_head_bytes: usize,
}

/// How a parsed head frames its body.
enum Framing {
    Length(u64),
    Chunked,
    Ambiguous,
    /// Not ours to follow: hyper refuses it, or the connection stops being HTTP/1.1.
    Unfollowable,
}

impl Tracker {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let state = std::mem::replace(&mut self.state, State::Done);
            let (next, used) = match state {
                State::Done => return,
                State::Head(mut head) => {
                    head.extend_from_slice(bytes);
                    match self.head(&head) {
                        // The rest of `bytes` beyond the head belongs to the body.
                        Some((len, next)) => {
                            let extra = head.len().saturating_sub(len);
                            (next, bytes.len().saturating_sub(extra))
                        }
                        None if head.len() > self.max_head_bytes => (State::Done, bytes.len()),
                        None => (State::Head(head), bytes.len()),
                    }
                }
                State::Body(left) => {
                    let used = usize::try_from(left).unwrap_or(usize::MAX).min(bytes.len());
                    let left = left - used as u64;
                    let next = if left == 0 {
                        self.index += 1;
                        State::Head(Vec::new())
                    } else {
                        State::Body(left)
                    };
                    (next, used)
                }
                State::ChunkSize(mut line) => {
                    let (used, complete) = take_line(&mut line, bytes);
                    let next = if !complete {
                        if line.len() > self.max_head_bytes {
                            State::Done
                        } else {
                            State::ChunkSize(line)
                        }
                    } else {
                        match httparse::parse_chunk_size(&line) {
                            Ok(httparse::Status::Complete((_, 0))) => State::Trailers(Vec::new()),
                            Ok(httparse::Status::Complete((_, size))) => State::ChunkData(size),
                            _ => State::Done,
                        }
                    };
                    (next, used)
                }
                State::ChunkData(left) => {
                    let used = usize::try_from(left).unwrap_or(usize::MAX).min(bytes.len());
                    let left = left - used as u64;
                    let next = if left == 0 {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(left)
                    };
                    (next, used)
                }
                State::ChunkEnd => match bytes.iter().position(|&b| b == b'\n') {
                    Some(end) => (State::ChunkSize(Vec::new()), end + 1),
                    None => (State::ChunkEnd, bytes.len()),
                },
                State::Trailers(mut line) => {
                    let (used, complete) = take_line(&mut line, bytes);
                    let next = if !complete {
                        if line.len() > self.max_head_bytes {
                            State::Done
                        } else {
                            State::Trailers(line)
                        }
                    } else if line == b"\r\n" || line == b"\n" {
                        self.index += 1;
                        State::Head(Vec::new())
                    } else {
                        State::Trailers(Vec::new())
                    };
                    (next, used)
                }
            };
            self.state = next;
            bytes = &bytes[used..];
        }
    }

    /// Parses a complete head: its length and the state that follows it.
    fn head(&mut self, head: &[u8]) -> Option<(usize, State)> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let len = match request.parse(head) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return None,
            Err(_) => return Some((head.len(), State::Done)),
        };
        let next = match framing(&request) {
            Framing::Length(0) => {
                self.index += 1;
                State::Head(Vec::new())
            }
            Framing::Length(n) => State::Body(n),
            Framing::Chunked => State::ChunkSize(Vec::new()),
            Framing::Ambiguous => {
                self.verdict.mark(self.index);
                State::Done
            }
            Framing::Unfollowable => State::Done,
        };
        Some((len, next))
    }
}

/// Appends `bytes` to `line` up to and including a `\n`: (bytes used, line complete).
fn take_line(line: &mut Vec<u8>, bytes: &[u8]) -> (usize, bool) {
    match bytes.iter().position(|&b| b == b'\n') {
        Some(end) => {
            line.extend_from_slice(&bytes[..=end]);
            (end + 1, true)
        }
        None => {
            line.extend_from_slice(bytes);
            (bytes.len(), false)
        }
    }
}

fn framing(request: &httparse::Request<'_, '_>) -> Framing {
    let mut lengths = 0usize;
    let mut length = None;
    let mut codings = 0usize;
    let mut chunked_last = false;
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            length = std::str::from_utf8(header.value)
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok());
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            codings += 1;
            chunked_last = std::str::from_utf8(header.value).is_ok_and(|text| {
                text.rsplit(',')
                    .next()
                    .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
            });
        } else if header.name.eq_ignore_ascii_case("upgrade") {
            return Framing::Unfollowable;
        }
    }
    if lengths > 1 || (lengths > 0 && codings > 0) {
        return Framing::Ambiguous;
    }
    if request.method == Some("CONNECT") {
        return Framing::Unfollowable;
    }
    if codings > 0 {
        return if chunked_last {
            Framing::Chunked
        } else {
            Framing::Unfollowable
        };
    }
    match (lengths, length) {
        (0, _) => Framing::Length(0),
        (_, Some(length)) => Framing::Length(length),
        (_, None) => Framing::Unfollowable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `stream` in pieces of `step` bytes; returns which requests (by index) would be
    /// served before the first refused one, and whether any was refused.
    fn verdict_after(stream: &[u8], step: usize) -> (u64, bool) {
        let verdict = Arc::new(FramingVerdict::default());
        let mut tracker = Tracker {
            state: State::Head(Vec::new()),
            verdict: verdict.clone(),
            index: 0,
            max_head_bytes: 8192,
        };
        for piece in stream.chunks(step) {
            tracker.feed(piece);
        }
        let from = verdict.ambiguous_from.load(Ordering::Acquire);
        (tracker.index, from != u64::MAX)
    }

    const GOOD: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: x\r\n\r\n\
POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n";

    #[test]
    fn well_framed_requests_are_followed_in_any_split() {
        for step in [1, 2, 7, 64, 4096] {
            assert_eq!(verdict_after(GOOD, step), (3, false), "step {step}");
        }
    }

    #[test]
    fn length_and_chunked_together_and_repeated_lengths_are_marked() {
        for head in [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding:  chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: identity\r\n\r\n",
        ] {
            let verdict = Arc::new(FramingVerdict::default());
            let mut tracker = Tracker {
                state: State::Head(Vec::new()),
                verdict: verdict.clone(),
                index: 0,
                max_head_bytes: 8192,
            };
            // A good request first: the second one is the ambiguous one.
            tracker.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
            tracker.feed(head.as_bytes());
            assert!(verdict.admit(), "{head}");
            assert!(!verdict.admit(), "{head}");
        }
    }

    #[test]
    fn what_cannot_be_followed_is_left_to_hyper() {
        let (_, marked) = verdict_after(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 4096);
        assert!(!marked);
        let (index, marked) = verdict_after(b"GARBAGE\r\n\r\nPOST", 4096);
        assert_eq!((index, marked), (0, false));
    }
}
