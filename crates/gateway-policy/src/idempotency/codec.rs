//! A small binary encoding of [`StoredResponse`] for Redis.
//!
//! JSON would need the body in base64 (a third larger, and bodies are most of the bytes), so
//! the layout is length-prefixed fields followed by the raw body. A leading version byte lets
//! a later layout coexist during a rolling upgrade: an entry a replica cannot read is treated
//! as absent rather than replayed wrongly.
//!
//! Layout: `version:u8 status:u16 id_len:u32 id header_count:u32 (name_len:u32 name
//! value_len:u32 value)* body`, integers big-endian.

use super::StoredResponse;
use bytes::Bytes;

const VERSION: u8 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum DecodeError {
    #[error("unknown stored-response layout version {0}")]
    Version(u8),
    #[error("stored response is truncated")]
    Truncated,
    #[error("stored response has a non-UTF-8 text field")]
    NotUtf8,
}

pub(super) fn encode(response: &StoredResponse) -> Vec<u8> {
    let mut out = Vec::with_capacity(response.approx_size() + 16);
    out.push(VERSION);
    out.extend_from_slice(&response.status.to_be_bytes());
    put_str(&mut out, &response.request_id);
    put_len(&mut out, response.headers.len());
    for (name, value) in &response.headers {
        put_str(&mut out, name);
        put_str(&mut out, value);
    }
    out.extend_from_slice(&response.body);
    out
}

pub(super) fn decode(bytes: &[u8]) -> Result<StoredResponse, DecodeError> {
    let mut reader = Reader { rest: bytes };
    let version = reader.take(1)?[0];
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let status_bytes = reader.take(2)?;
    let status = u16::from_be_bytes([status_bytes[0], status_bytes[1]]);
    let request_id = reader.string()?;
    let count = reader.len()?;
    // Each header needs at least eight bytes of lengths; capping the reservation by that keeps
    // a corrupt count from allocating more than the input could describe.
    let mut headers = Vec::with_capacity(count.min(reader.rest.len() / 8));
    for _ in 0..count {
        let name = reader.string()?;
        let value = reader.string()?;
        headers.push((name, value));
    }
    Ok(StoredResponse {
        status,
        headers,
        body: Bytes::copy_from_slice(reader.rest),
        request_id,
    })
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    // Header names, values and ids are far below 4 GiB; saturating keeps this total, and the
    // decoder then reports the entry as truncated instead of misreading it.
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    put_len(out, text.len());
    out.extend_from_slice(text.as_bytes());
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn len(&mut self) -> Result<usize, DecodeError> {
        let b = self.take(4)?;
        let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        usize::try_from(len).map_err(|_| DecodeError::Truncated)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let len = self.len()?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::NotUtf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoredResponse {
        StoredResponse {
            status: 201,
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("x-empty".into(), String::new()),
            ],
            body: Bytes::from_static(b"{\"id\":\"chatcmpl-1\"}\0\xff binary tail"),
            request_id: "req-123".into(),
        }
    }

    #[test]
    fn round_trips() {
        let response = sample();
        assert_eq!(decode(&encode(&response)).unwrap(), response);
    }

    #[test]
    fn round_trips_empty_body_and_headers() {
        let response = StoredResponse {
            status: 204,
            headers: Vec::new(),
            body: Bytes::new(),
            request_id: String::new(),
        };
        assert_eq!(decode(&encode(&response)).unwrap(), response);
    }

    #[test]
    fn rejects_unknown_version_and_truncation() {
        let mut bytes = encode(&sample());
        bytes[0] = 9;
        assert_eq!(decode(&bytes), Err(DecodeError::Version(9)));
        let bytes = encode(&sample());
        // Cut inside the header list: the body is "the rest", so only a cut before it shows.
        assert_eq!(decode(&bytes[..20]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[]), Err(DecodeError::Truncated));
    }

    #[test]
    fn huge_header_count_does_not_allocate_it() {
        let mut bytes = vec![VERSION, 0, 200, 0, 0, 0, 0];
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode(&bytes), Err(DecodeError::Truncated));
    }
}
