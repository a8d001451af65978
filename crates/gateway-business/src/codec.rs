//! Entry payloads of the spool: a compact binary form of usage records and start markers.
//!
//! Hand-written rather than derived so the request path encodes straight into the spool's
//! buffer without an intermediate allocation, and so the layout on disk is fixed by this file
//! rather than by a library's version. Every payload begins with its kind, the time it was
//! spooled and the request id, which recovery reads without decoding the rest. A spool written
//! by another layout is recognised by its kind byte and skipped, never misread.
//!
//! A record's billing fields (cache-write tokens, cost and the price row) follow the first
//! layout as a tagged block: a record spooled before they existed ends without it and is
//! read with no cost, so an upgrade ships what the previous version spooled.

use crate::cost::Cost;
use crate::prices::PriceConfig;
use crate::record::UsageRecord;
use gateway_core::{Principal, RequestContext};
use rust_decimal::Decimal;
use std::borrow::Cow;
use std::sync::Arc;
use time::OffsetDateTime;
use uuid::Uuid;

/// What an entry says. The values are on disk: never renumber them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A finished request's usage record.
    Finished = 1,
    /// A request that reached routing and has not finished yet.
    Started = 2,
    /// The record made at recovery for a start whose finish never came.
    Interrupted = 3,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Finished),
            2 => Some(Self::Started),
            3 => Some(Self::Interrupted),
            _ => None,
        }
    }

    /// Whether the entry becomes a row of `usage_events` (a start marker does not).
    pub(crate) fn is_record(self) -> bool {
        matches!(self, Self::Finished | Self::Interrupted)
    }
}

/// `error_type` of the row written for a request whose process died before it finished.
pub const INTERRUPTED: &str = "interrupted";

/// A request that reached routing, announced before it is served: if the gateway dies before
/// the request finishes, recovery turns this into a usage row with `status` 0 and `error_type`
/// `interrupted`, so a request that may have cost money never vanishes from the ledger.
#[derive(Debug, Clone, Copy)]
pub struct StartedRequest<'a> {
    pub request_id: Uuid,
    pub received_at: OffsetDateTime,
    pub project: Option<&'a str>,
    pub key_id: Option<&'a str>,
    /// The project's tags as a JSON object (`{}` when there are none).
    pub tags: &'a str,
    pub alias: Option<&'a str>,
    pub streamed: bool,
}

impl<'a> StartedRequest<'a> {
    /// The start of `context`'s request, as routing sees it once it resolved `alias`.
    pub fn new(
        context: &RequestContext,
        principal: Option<&'a Principal>,
        alias: &'a str,
        streamed: bool,
    ) -> Self {
        Self {
            request_id: context.id.as_uuid(),
            received_at: context.received_at,
            project: principal.map(|p| &*p.project),
            key_id: principal.map(|p| &*p.key_id),
            tags: principal.map_or("{}", |p| &*p.tags_json),
            alias: Some(alias),
            streamed,
        }
    }
}

/// What every payload begins with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: Kind,
    /// Unix milliseconds when the entry was appended.
    pub spooled_at: i64,
    pub request_id: Uuid,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum DecodeError {
    #[error("unknown entry kind {0}")]
    UnknownKind(u8),
    #[error("entry ends early")]
    Short,
    #[error("invalid text")]
    Utf8,
    #[error("invalid timestamp")]
    Time,
    #[error("expected a {expected:?} entry, found {found:?}")]
    WrongKind { expected: &'static str, found: Kind },
    #[error("{0} bytes left over")]
    Trailing(usize),
    #[error("unknown record extension {0}")]
    UnknownExtension(u8),
    #[error("invalid cost")]
    Cost,
}

/// Tag of the billing block that follows a record's first layout. On disk: never reuse it.
const BILLING: u8 = 1;

pub(crate) fn encode_record(buf: &mut Vec<u8>, kind: Kind, spooled_at: i64, record: &UsageRecord) {
    put_header(buf, kind, spooled_at, record.request_id);
    put_time(buf, record.created_at);
    put_opt_str(buf, record.project.as_deref());
    put_opt_str(buf, record.key_id.as_deref());
    put_str(buf, &record.tags);
    put_opt_str(buf, record.alias.as_deref());
    put_opt_str(buf, record.provider.as_deref());
    put_opt_str(buf, record.upstream_model.as_deref());
    buf.extend_from_slice(&record.attempts.to_le_bytes());
    buf.extend_from_slice(&record.status.to_le_bytes());
    put_opt_str(buf, record.error_type.as_deref());
    for tokens in [
        record.input_tokens,
        record.output_tokens,
        record.cached_tokens,
        record.reasoning_tokens,
    ] {
        put_opt_i64(buf, tokens);
    }
    put_opt_str(buf, record.usage_source.as_deref());
    buf.extend_from_slice(&record.elapsed_ms.to_le_bytes());
    put_opt_f64(buf, record.ttft_ms);
    buf.push(u8::from(record.streamed));
    buf.push(u8::from(record.client_aborted));
    put_opt_str(buf, record.vendor_response_id.as_deref());
    put_opt_str(buf, record.vendor_request_id.as_deref());
    buf.push(BILLING);
    put_opt_i64(buf, record.cache_write_tokens);
    match &record.cost {
        None => buf.push(0),
        Some(cost) => {
            buf.push(1);
            buf.extend_from_slice(&cost.amount().serialize());
            let price = cost.price();
            put_str(buf, &price.provider);
            put_str(buf, &price.model);
            match price.effective_from {
                Some(day) => {
                    buf.push(1);
                    buf.extend_from_slice(&day.to_julian_day().to_le_bytes());
                }
                None => buf.push(0),
            }
            buf.extend_from_slice(&price.input_per_million.serialize());
            buf.extend_from_slice(&price.output_per_million.serialize());
            for amount in [
                price.cached_input_per_million,
                price.cache_write_per_million,
                price.reasoning_per_million,
            ] {
                match amount {
                    Some(amount) => {
                        buf.push(1);
                        buf.extend_from_slice(&amount.serialize());
                    }
                    None => buf.push(0),
                }
            }
            put_str(buf, &price.currency);
        }
    }
}

pub(crate) fn encode_started(buf: &mut Vec<u8>, spooled_at: i64, started: &StartedRequest<'_>) {
    put_header(buf, Kind::Started, spooled_at, started.request_id);
    put_time(buf, started.received_at);
    put_opt_str(buf, started.project);
    put_opt_str(buf, started.key_id);
    put_str(buf, started.tags);
    put_opt_str(buf, started.alias);
    buf.push(u8::from(started.streamed));
}

pub(crate) fn peek(payload: &[u8]) -> Result<Header, DecodeError> {
    let mut cursor = Cursor(payload);
    cursor.header()
}

/// Decodes a finished or interrupted entry.
pub(crate) fn decode_record(payload: &[u8]) -> Result<(Header, UsageRecord), DecodeError> {
    let mut c = Cursor(payload);
    let header = c.header()?;
    if !header.kind.is_record() {
        return Err(DecodeError::WrongKind {
            expected: "record",
            found: header.kind,
        });
    }
    let mut record = UsageRecord {
        request_id: header.request_id,
        created_at: c.time()?,
        project: c.opt_str()?.map(Arc::from),
        key_id: c.opt_str()?.map(Arc::from),
        tags: Arc::from(c.str()?),
        alias: c.opt_str()?.map(Arc::from),
        provider: c.opt_str()?.map(Arc::from),
        upstream_model: c.opt_str()?.map(Arc::from),
        attempts: c.i32()?,
        status: c.i32()?,
        error_type: c.opt_str()?.map(|s| Cow::Owned(s.to_owned())),
        input_tokens: c.opt_i64()?,
        output_tokens: c.opt_i64()?,
        cached_tokens: c.opt_i64()?,
        reasoning_tokens: c.opt_i64()?,
        usage_source: c.opt_str()?.map(|s| Cow::Owned(s.to_owned())),
        elapsed_ms: c.f64()?,
        ttft_ms: c.opt_f64()?,
        streamed: c.bool()?,
        client_aborted: c.bool()?,
        vendor_response_id: c.opt_str()?.map(str::to_owned),
        vendor_request_id: c.opt_str()?.map(str::to_owned),
        cache_write_tokens: None,
        cost: None,
    };
    if !c.0.is_empty() {
        let [tag] = c.take::<1>()?;
        if tag != BILLING {
            return Err(DecodeError::UnknownExtension(tag));
        }
        record.cache_write_tokens = c.opt_i64()?;
        if c.present()? {
            let amount = c.decimal()?;
            let price = PriceConfig {
                provider: c.str()?.to_owned(),
                model: c.str()?.to_owned(),
                effective_from: if c.present()? {
                    Some(
                        time::Date::from_julian_day(i32::from_le_bytes(c.take()?))
                            .map_err(|_| DecodeError::Time)?,
                    )
                } else {
                    None
                },
                input_per_million: c.decimal()?,
                output_per_million: c.decimal()?,
                cached_input_per_million: c.opt_decimal()?,
                cache_write_per_million: c.opt_decimal()?,
                reasoning_per_million: c.opt_decimal()?,
                currency: c.str()?.to_owned(),
            };
            record.cost = Some(Cost::new(amount, Arc::new(price)).ok_or(DecodeError::Cost)?);
        }
    }
    c.finish()?;
    Ok((header, record))
}

/// The row of a started request that never finished: what the start marker knows, status 0,
/// `error_type` [`INTERRUPTED`], no usage (nobody knows what the vendor counted).
pub(crate) fn interrupted_record(payload: &[u8]) -> Result<UsageRecord, DecodeError> {
    let mut c = Cursor(payload);
    let header = c.header()?;
    if header.kind != Kind::Started {
        return Err(DecodeError::WrongKind {
            expected: "started",
            found: header.kind,
        });
    }
    let record = UsageRecord {
        request_id: header.request_id,
        created_at: c.time()?,
        project: c.opt_str()?.map(Arc::from),
        key_id: c.opt_str()?.map(Arc::from),
        tags: Arc::from(c.str()?),
        alias: c.opt_str()?.map(Arc::from),
        provider: None,
        upstream_model: None,
        attempts: 1,
        status: 0,
        error_type: Some(Cow::Borrowed(INTERRUPTED)),
        input_tokens: None,
        output_tokens: None,
        cached_tokens: None,
        reasoning_tokens: None,
        usage_source: None,
        elapsed_ms: 0.0,
        ttft_ms: None,
        streamed: c.bool()?,
        client_aborted: false,
        vendor_response_id: None,
        vendor_request_id: None,
        cache_write_tokens: None,
        cost: None,
    };
    c.finish()?;
    Ok(record)
}

fn put_header(buf: &mut Vec<u8>, kind: Kind, spooled_at: i64, request_id: Uuid) {
    buf.push(kind as u8);
    buf.extend_from_slice(&spooled_at.to_le_bytes());
    buf.extend_from_slice(request_id.as_bytes());
}

fn put_time(buf: &mut Vec<u8>, at: OffsetDateTime) {
    buf.extend_from_slice(&at.unix_timestamp_nanos().to_le_bytes());
}

fn put_str(buf: &mut Vec<u8>, text: &str) {
    // A string past 4 GiB is cut; the entry is then far over the spool's entry limit and is
    // refused as a whole, so the cut never reaches the disk.
    let len = u32::try_from(text.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(text.as_bytes().get(..len as usize).unwrap_or_default());
}

fn put_opt_str(buf: &mut Vec<u8>, text: Option<&str>) {
    match text {
        Some(text) => {
            buf.push(1);
            put_str(buf, text);
        }
        None => buf.push(0),
    }
}

fn put_opt_i64(buf: &mut Vec<u8>, value: Option<i64>) {
    match value {
        Some(value) => {
            buf.push(1);
            buf.extend_from_slice(&value.to_le_bytes());
        }
        None => buf.push(0),
    }
}

fn put_opt_f64(buf: &mut Vec<u8>, value: Option<f64>) {
    match value {
        Some(value) => {
            buf.push(1);
            buf.extend_from_slice(&value.to_le_bytes());
        }
        None => buf.push(0),
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or(DecodeError::Short)?;
        self.0 = rest;
        Ok(*head)
    }

    fn bytes(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < len {
            return Err(DecodeError::Short);
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(head)
    }

    fn header(&mut self) -> Result<Header, DecodeError> {
        let [kind] = self.take::<1>()?;
        let kind = Kind::from_byte(kind).ok_or(DecodeError::UnknownKind(kind))?;
        Ok(Header {
            kind,
            spooled_at: i64::from_le_bytes(self.take()?),
            request_id: Uuid::from_bytes(self.take()?),
        })
    }

    fn time(&mut self) -> Result<OffsetDateTime, DecodeError> {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from_le_bytes(self.take()?))
            .map_err(|_| DecodeError::Time)
    }

    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let len = u32::from_le_bytes(self.take()?) as usize;
        std::str::from_utf8(self.bytes(len)?).map_err(|_| DecodeError::Utf8)
    }

    fn present(&mut self) -> Result<bool, DecodeError> {
        self.bool()
    }

    fn bool(&mut self) -> Result<bool, DecodeError> {
        let [byte] = self.take::<1>()?;
        Ok(byte != 0)
    }

    fn opt_str(&mut self) -> Result<Option<&'a str>, DecodeError> {
        if self.present()? {
            self.str().map(Some)
        } else {
            Ok(None)
        }
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_le_bytes(self.take()?))
    }

    fn f64(&mut self) -> Result<f64, DecodeError> {
        Ok(f64::from_le_bytes(self.take()?))
    }

    fn opt_i64(&mut self) -> Result<Option<i64>, DecodeError> {
        if self.present()? {
            Ok(Some(i64::from_le_bytes(self.take()?)))
        } else {
            Ok(None)
        }
    }

    fn decimal(&mut self) -> Result<Decimal, DecodeError> {
        Ok(Decimal::deserialize(self.take()?))
    }

    fn opt_decimal(&mut self) -> Result<Option<Decimal>, DecodeError> {
        if self.present()? {
            self.decimal().map(Some)
        } else {
            Ok(None)
        }
    }

    fn opt_f64(&mut self) -> Result<Option<f64>, DecodeError> {
        if self.present()? {
            self.f64().map(Some)
        } else {
            Ok(None)
        }
    }

    fn finish(self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing(self.0.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail on the spot")]
    use super::*;

    pub(crate) fn sample(id: Uuid) -> UsageRecord {
        UsageRecord {
            request_id: id,
            created_at: OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_789)
                .unwrap(),
            project: Some("team-a".into()),
            key_id: None,
            tags: r#"{"team":"a"}"#.into(),
            alias: Some("chat".into()),
            provider: Some("openai".into()),
            upstream_model: Some("gpt-x".into()),
            attempts: 2,
            status: 200,
            error_type: None,
            input_tokens: Some(12),
            output_tokens: Some(-1),
            cached_tokens: None,
            reasoning_tokens: Some(i64::MAX),
            usage_source: Some(Cow::Borrowed("vendor")),
            elapsed_ms: 12.5,
            ttft_ms: Some(3.25),
            streamed: true,
            client_aborted: false,
            vendor_response_id: Some("resp-1".into()),
            vendor_request_id: None,
            cache_write_tokens: Some(7),
            cost: Cost::new(
                Decimal::new(123, 6),
                Arc::new(PriceConfig {
                    provider: "openai".into(),
                    model: "gpt-x".into(),
                    input_per_million: Decimal::new(15, 2),
                    output_per_million: Decimal::new(6, 1),
                    cached_input_per_million: Some(Decimal::new(75, 3)),
                    cache_write_per_million: None,
                    reasoning_per_million: Some(Decimal::ZERO),
                    currency: "EUR".into(),
                    effective_from: Some(time::macros::date!(2026 - 06 - 01)),
                }),
            ),
        }
    }

    #[test]
    fn records_round_trip() {
        let record = sample(Uuid::now_v7());
        let mut buf = Vec::new();
        encode_record(&mut buf, Kind::Finished, 42, &record);
        let (header, decoded) = decode_record(&buf).unwrap();
        assert_eq!(header.kind, Kind::Finished);
        assert_eq!(header.spooled_at, 42);
        assert_eq!(decoded, record);
        assert_eq!(peek(&buf).unwrap(), header);
        // Every shorter prefix is refused, never misread, except the one that ends where the
        // first layout did: a record spooled before the billing block existed.
        let first_layout = buf.len() - billing_block_len(&record);
        for len in 0..buf.len() {
            assert_eq!(
                decode_record(&buf[..len]).is_ok(),
                len == first_layout,
                "prefix {len}"
            );
        }
        let (_, old) = decode_record(&buf[..first_layout]).unwrap();
        assert_eq!((old.cost, old.cache_write_tokens), (None, None));
        assert_eq!(old.vendor_response_id, record.vendor_response_id);

        let unpriced = UsageRecord {
            cost: None,
            ..record
        };
        buf.clear();
        encode_record(&mut buf, Kind::Finished, 42, &unpriced);
        assert_eq!(decode_record(&buf).unwrap().1, unpriced);
    }

    fn billing_block_len(record: &UsageRecord) -> usize {
        let mut with = Vec::new();
        encode_record(&mut with, Kind::Finished, 0, record);
        let mut first = Vec::new();
        let mut bare = record.clone();
        bare.cost = None;
        bare.cache_write_tokens = None;
        encode_record(&mut first, Kind::Finished, 0, &bare);
        // The bare record's block is a tag, an absent count and an absent cost.
        with.len() - (first.len() - 3)
    }

    #[test]
    fn a_start_becomes_an_interrupted_row() {
        let id = Uuid::now_v7();
        let started = StartedRequest {
            request_id: id,
            received_at: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            project: Some("p"),
            key_id: Some("k"),
            tags: "{}",
            alias: Some("chat"),
            streamed: true,
        };
        let mut buf = Vec::new();
        encode_started(&mut buf, 7, &started);
        assert_eq!(peek(&buf).unwrap().kind, Kind::Started);
        let row = interrupted_record(&buf).unwrap();
        assert_eq!(row.request_id, id);
        assert_eq!(row.status, 0);
        assert_eq!(row.error_type.as_deref(), Some(INTERRUPTED));
        assert_eq!(row.usage_source, None);
        assert_eq!(row.project.as_deref(), Some("p"));
        assert!(row.streamed);
        assert!(decode_record(&buf).is_err());
        buf[0] = 9;
        assert_eq!(peek(&buf), Err(DecodeError::UnknownKind(9)));
    }
}
