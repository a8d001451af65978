//! The spool on disk: segment files of framed entries, the checkpoint, and recovery.
//!
//! A segment is `{seq:020}.seg`: an 8-byte magic, then entries, each
//! `[payload length: u32 LE][CRC-32C of the length bytes and the payload: u32 LE][payload]`.
//! Entries are only ever appended, a whole group per write, followed by an fsync. A crash can
//! leave a torn group at the end of the last segment; its length or CRC does not check out,
//! and recovery truncates the file there. The CRC covers the length too, so a tail of zeros
//! (what some filesystems show after a crash) is never read as an entry.
//!
//! The checkpoint (`checkpoint`, replaced atomically by write-temp, fsync, rename) says where
//! shipping stands: everything before its position is in the database. It also carries the
//! start markers before that position whose finish had not been seen, so recovery can tell
//! which requests were cut off by the crash. Every function here blocks: they run on tokio's
//! blocking pool.

use crate::codec::{self, Kind};
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use uuid::Uuid;

const SEGMENT_MAGIC: &[u8; 8] = b"GWSPOOL1";
const CHECKPOINT_MAGIC: &[u8; 8] = b"GWCKPT01";
/// Bytes before a segment's first entry.
pub(crate) const SEGMENT_HEADER: u64 = SEGMENT_MAGIC.len() as u64;
/// Bytes before an entry's payload: its length and its CRC.
pub(crate) const ENTRY_HEADER: usize = 8;
/// Largest payload accepted. Far above any real record; it bounds what a corrupt length field
/// can make a reader allocate.
pub(crate) const MAX_PAYLOAD: usize = 1 << 20;
const CHECKPOINT: &str = "checkpoint";
const CHECKPOINT_TMP: &str = "checkpoint.tmp";
const LOCK: &str = "LOCK";

#[derive(Debug, thiserror::Error)]
pub(crate) enum SpoolError {
    #[error("the spool directory {0} is in use by another gateway")]
    Locked(PathBuf),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// A place in the spool: a segment and a byte offset in it. Ordered as the entries are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Pos {
    pub seq: u64,
    pub off: u64,
}

/// A start marker whose finish has not been seen yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OpenStart {
    pub spooled_at: i64,
    /// The whole marker payload: recovery makes the interrupted row from it.
    pub payload: Vec<u8>,
}

pub(crate) type OpenStarts = HashMap<Uuid, OpenStart>;

// ---------------------------------------------------------------------------------------------
// Entries

/// Appends one entry whose payload `encode` writes. The CRC is left zero: [`seal`] fills it in
/// when the group is written, so the request path does not pay for it.
pub(crate) fn frame(buf: &mut Vec<u8>, encode: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0; ENTRY_HEADER]);
    encode(buf);
    // Saturates for a payload over 4 GiB; such an entry is far over MAX_PAYLOAD and refused.
    let len = u32::try_from(buf.len() - start - ENTRY_HEADER).unwrap_or(u32::MAX);
    if let Some(field) = buf.get_mut(start..start + 4) {
        field.copy_from_slice(&len.to_le_bytes());
    }
}

/// Fills in the CRC of every entry of a group made by [`frame`].
pub(crate) fn seal(group: &mut [u8]) {
    let mut rest = group;
    while let Some((head, tail)) = rest.split_first_chunk_mut::<ENTRY_HEADER>() {
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let Some((payload, next)) = tail.split_at_mut_checked(len) else {
            return;
        };
        let crc = entry_crc(&head[..4], payload);
        head[4..].copy_from_slice(&crc.to_le_bytes());
        rest = next;
    }
}

fn entry_crc(len: &[u8], payload: &[u8]) -> u32 {
    crc32c_finish(crc32c_update(crc32c_update(!0, len), payload))
}

/// How a run of entries ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tail {
    /// Every byte was part of a valid entry.
    Clean,
    /// The bytes end in the middle of an entry's header or payload.
    Incomplete,
    /// An entry's length is out of range or its CRC does not match.
    Invalid,
}

/// Valid entries at the start of `data`: the byte ranges of their payloads, the end of the
/// last one, and why reading stopped.
pub(crate) fn parse(data: &[u8]) -> (Vec<std::ops::Range<usize>>, usize, Tail) {
    let mut entries = Vec::new();
    let mut at = 0;
    loop {
        let Some(header) = data.get(at..at + ENTRY_HEADER) else {
            let tail = if at == data.len() {
                Tail::Clean
            } else {
                Tail::Incomplete
            };
            return (entries, at, tail);
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len == 0 || len > MAX_PAYLOAD {
            return (entries, at, Tail::Invalid);
        }
        let body = at + ENTRY_HEADER..at + ENTRY_HEADER + len;
        let Some(payload) = data.get(body.clone()) else {
            return (entries, at, Tail::Incomplete);
        };
        if entry_crc(&header[..4], payload) != crc {
            return (entries, at, Tail::Invalid);
        }
        entries.push(body.clone());
        at = body.end;
    }
}

/// Counts the entries of a group made by [`frame`]: (usage records, start markers).
pub(crate) fn count_kinds(group: &[u8]) -> (u64, u64) {
    let mut counts = (0, 0);
    let mut rest = group;
    while let Some((head, tail)) = rest.split_first_chunk::<ENTRY_HEADER>() {
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let Some((payload, next)) = tail.split_at_checked(len) else {
            break;
        };
        if payload.first() == Some(&(Kind::Started as u8)) {
            counts.1 += 1;
        } else {
            counts.0 += 1;
        }
        rest = next;
    }
    counts
}

// CRC-32C (Castagnoli), table-driven. Written here rather than pulled in as a crate: a few
// lines, and the spool's format should not move with a dependency.
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

fn crc32c_update(mut crc: u32, data: &[u8]) -> u32 {
    for &byte in data {
        crc = CRC_TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

fn crc32c_finish(crc: u32) -> u32 {
    !crc
}

pub(crate) fn crc32c(data: &[u8]) -> u32 {
    crc32c_finish(crc32c_update(!0, data))
}

// ---------------------------------------------------------------------------------------------
// Files

pub(crate) fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.seg"))
}

fn segment_seq(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The segment being appended to.
#[derive(Debug)]
pub(crate) struct SegmentWriter {
    dir: PathBuf,
    file: File,
    pub seq: u64,
    /// Bytes written and fsynced.
    pub len: u64,
    /// A write or fsync failed: what the file holds past `len` is unknown (after a failed
    /// fsync even the page cache cannot be trusted), so nothing more goes into it.
    broken: bool,
}

impl SegmentWriter {
    pub(crate) fn create(dir: &Path, seq: u64) -> Result<Self, SpoolError> {
        let path = segment_path(dir, seq);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_error("creating", &path))?;
        file.write_all(SEGMENT_MAGIC)
            .and_then(|()| file.sync_all())
            .map_err(io_error("writing", &path))?;
        // The new name must survive a crash too, or recovery would not find the entries.
        sync_dir(dir).map_err(io_error("syncing", dir))?;
        Ok(Self {
            dir: dir.to_owned(),
            file,
            seq,
            len: SEGMENT_HEADER,
            broken: false,
        })
    }

    /// Appends a sealed group and makes it durable, first moving to a new segment when this one
    /// is full or broken.
    pub(crate) fn append(&mut self, group: &[u8], segment_bytes: u64) -> Result<(), SpoolError> {
        if self.broken || (self.len >= segment_bytes && self.len > SEGMENT_HEADER) {
            *self = Self::create(&self.dir, self.seq + 1)?;
        }
        let result = self
            .file
            .write_all(group)
            .and_then(|()| self.file.sync_data());
        match result {
            Ok(()) => {
                self.len += group.len() as u64;
                Ok(())
            }
            Err(source) => {
                self.broken = true;
                // Best effort: leave no half-written group behind. Recovery would truncate it
                // anyway, and readers in this process never read past `len`.
                let _ignored = self.file.set_len(self.len);
                Err(SpoolError::Io {
                    action: "writing",
                    path: segment_path(&self.dir, self.seq),
                    source,
                })
            }
        }
    }
}

/// Reads `from..to` of a segment.
pub(crate) fn read_range(dir: &Path, seq: u64, from: u64, to: u64) -> Result<Vec<u8>, SpoolError> {
    let path = segment_path(dir, seq);
    let mut data = vec![0; usize::try_from(to.saturating_sub(from)).unwrap_or(0)];
    let mut file = File::open(&path).map_err(io_error("opening", &path))?;
    file.seek(SeekFrom::Start(from))
        .and_then(|_| file.read_exact(&mut data))
        .map_err(io_error("reading", &path))?;
    Ok(data)
}

pub(crate) fn remove_segments(dir: &Path, seqs: &[u64]) -> Result<(), SpoolError> {
    for &seq in seqs {
        let path = segment_path(dir, seq);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(io_error("removing", &path)(err)),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Checkpoint

/// Where shipping stands, as of the last database commit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    /// Everything before this position is in the database (or was a start marker).
    pub pos: Pos,
    /// Start markers before `pos` whose finish was not seen by then.
    pub open: OpenStarts,
}

impl Checkpoint {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            32 + self
                .open
                .values()
                .map(|o| 4 + o.payload.len())
                .sum::<usize>(),
        );
        out.extend_from_slice(CHECKPOINT_MAGIC);
        out.extend_from_slice(&self.pos.seq.to_le_bytes());
        out.extend_from_slice(&self.pos.off.to_le_bytes());
        out.extend_from_slice(
            &u32::try_from(self.open.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        for open in self.open.values() {
            frame(&mut out, |buf| buf.extend_from_slice(&open.payload));
        }
        let crc = crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(data: &[u8]) -> Option<Self> {
        let (body, crc) = data.split_last_chunk::<4>()?;
        if crc32c(body) != u32::from_le_bytes(*crc) {
            return None;
        }
        let rest = body.strip_prefix(CHECKPOINT_MAGIC)?;
        let (seq, rest) = rest.split_first_chunk::<8>()?;
        let (off, rest) = rest.split_first_chunk::<8>()?;
        let (count, rest) = rest.split_first_chunk::<4>()?;
        let mut open = OpenStarts::new();
        // The markers are framed as entries; their CRCs are unchecked (the whole file's
        // covers them), only the lengths are used.
        let mut entries = rest;
        for _ in 0..u32::from_le_bytes(*count) {
            let (head, tail) = entries.split_first_chunk::<ENTRY_HEADER>()?;
            let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
            let (payload, next) = tail.split_at_checked(len)?;
            let header = codec::peek(payload).ok()?;
            open.insert(
                header.request_id,
                OpenStart {
                    spooled_at: header.spooled_at,
                    payload: payload.to_vec(),
                },
            );
            entries = next;
        }
        entries.is_empty().then_some(Self {
            pos: Pos {
                seq: u64::from_le_bytes(*seq),
                off: u64::from_le_bytes(*off),
            },
            open,
        })
    }

    /// Reads the checkpoint; `Ok(None)` when there is none (a new spool) or it does not check
    /// out (then shipping starts over from the oldest segment: duplicates are harmless).
    pub(crate) fn load(dir: &Path) -> Result<Option<Self>, SpoolError> {
        let path = dir.join(CHECKPOINT);
        match std::fs::read(&path) {
            Ok(data) => {
                let checkpoint = Self::decode(&data);
                if checkpoint.is_none() {
                    tracing::error!(path = %path.display(), "spool checkpoint is corrupt; shipping every spooled record again");
                }
                Ok(checkpoint)
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(io_error("reading", &path)(err)),
        }
    }

    /// Replaces the checkpoint atomically: a crash leaves the old one or the new one, never a
    /// mix.
    pub(crate) fn store(&self, dir: &Path) -> Result<(), SpoolError> {
        let tmp = dir.join(CHECKPOINT_TMP);
        let mut file = File::create(&tmp).map_err(io_error("creating", &tmp))?;
        file.write_all(&self.encode())
            .and_then(|()| file.sync_all())
            .map_err(io_error("writing", &tmp))?;
        drop(file);
        let path = dir.join(CHECKPOINT);
        std::fs::rename(&tmp, &path).map_err(io_error("renaming", &path))?;
        sync_dir(dir).map_err(io_error("syncing", dir))
    }
}

// ---------------------------------------------------------------------------------------------
// Recovery

/// What [`recover`] found and made of an existing spool.
#[derive(Debug)]
pub(crate) struct Recovered {
    /// Held (locked) as long as anything works on the spool.
    pub lock: File,
    /// The new segment this run appends to.
    pub writer: SegmentWriter,
    /// Every segment's length in bytes, the new one included.
    pub segments: BTreeMap<u64, u64>,
    /// Where shipping resumes, and the markers open there.
    pub checkpoint: Checkpoint,
    /// Entries after the checkpoint (the interrupted rows written just now included).
    pub unshipped: u64,
    /// When the oldest of them was spooled (Unix milliseconds).
    pub oldest: Option<i64>,
    /// Start markers without a finish, now spooled as interrupted rows.
    pub interrupted: u64,
    /// Bytes cut off torn or corrupt segment ends.
    pub truncated: u64,
}

/// Opens the spool in `dir` (creating it), takes its lock, and makes it consistent: torn
/// tails are truncated, shipped segments removed, and every start marker whose finish never
/// came becomes an interrupted row appended to a new segment (the process that spooled the
/// marker is gone: it held the lock).
pub(crate) fn recover(dir: &Path, now_ms: i64) -> Result<Recovered, SpoolError> {
    std::fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
    let lock_path = dir.join(LOCK);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_error("opening", &lock_path))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(SpoolError::Locked(dir.to_owned())),
        Err(std::fs::TryLockError::Error(err)) => return Err(io_error("locking", &lock_path)(err)),
    }
    match std::fs::remove_file(dir.join(CHECKPOINT_TMP)) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(io_error("removing", &dir.join(CHECKPOINT_TMP))(err)),
    }
    let checkpoint = Checkpoint::load(dir)?.unwrap_or_default();
    let mut seqs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error("listing", dir))? {
        let entry = entry.map_err(io_error("listing", dir))?;
        if let Some(seq) = entry.file_name().to_str().and_then(segment_seq) {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    let (shipped, rest): (Vec<u64>, Vec<u64>) =
        seqs.into_iter().partition(|&seq| seq < checkpoint.pos.seq);
    remove_segments(dir, &shipped)?;

    let mut open = checkpoint.open.clone();
    let mut segments = BTreeMap::new();
    let mut unshipped = 0;
    let mut oldest = None;
    let mut truncated = 0;
    for seq in rest {
        let path = segment_path(dir, seq);
        let data = std::fs::read(&path).map_err(io_error("reading", &path))?;
        if !data.starts_with(SEGMENT_MAGIC) {
            // Torn while being created: it never held a durable entry.
            if !data.is_empty() {
                tracing::warn!(path = %path.display(), bytes = data.len(), "spool segment without a valid header removed");
            }
            remove_segments(dir, &[seq])?;
            continue;
        }
        let start = if seq == checkpoint.pos.seq {
            usize::try_from(checkpoint.pos.off)
                .unwrap_or(usize::MAX)
                .clamp(SEGMENT_HEADER as usize, data.len())
        } else {
            SEGMENT_HEADER as usize
        };
        let (entries, end, tail) = parse(&data[start..]);
        for range in entries {
            let payload = &data[start + range.start..start + range.end];
            unshipped += 1;
            let Ok(header) = codec::peek(payload) else {
                continue;
            };
            oldest.get_or_insert(header.spooled_at);
            if header.kind == Kind::Started {
                open.insert(
                    header.request_id,
                    OpenStart {
                        spooled_at: header.spooled_at,
                        payload: payload.to_vec(),
                    },
                );
            } else {
                open.remove(&header.request_id);
            }
        }
        let valid = start + end;
        if tail != Tail::Clean {
            let cut = data.len() - valid;
            truncated += cut as u64;
            tracing::warn!(path = %path.display(), bytes = cut, ?tail, "torn spool tail truncated");
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_error("opening", &path))?;
            file.set_len(valid as u64)
                .and_then(|()| file.sync_all())
                .map_err(io_error("truncating", &path))?;
        }
        if valid as u64 == SEGMENT_HEADER {
            // Nothing in it (a run that spooled nothing): restarts while the database is away
            // would otherwise pile these up.
            remove_segments(dir, &[seq])?;
        } else {
            segments.insert(seq, valid as u64);
        }
    }

    let next = segments
        .keys()
        .next_back()
        .copied()
        .unwrap_or(0)
        .max(checkpoint.pos.seq)
        + 1;
    let mut writer = SegmentWriter::create(dir, next)?;
    let mut group = Vec::new();
    let mut interrupted = 0;
    for (id, start) in &open {
        match codec::interrupted_record(&start.payload) {
            Ok(record) => {
                frame(&mut group, |buf| {
                    codec::encode_record(buf, Kind::Interrupted, now_ms, &record);
                });
                interrupted += 1;
            }
            Err(err) => {
                tracing::error!(request_id = %id, error = %err, "unreadable start marker skipped");
            }
        }
    }
    if !group.is_empty() {
        seal(&mut group);
        writer.append(&group, u64::MAX)?;
        unshipped += interrupted;
        oldest.get_or_insert(now_ms);
    }
    segments.insert(writer.seq, writer.len);
    Ok(Recovered {
        lock,
        writer,
        segments,
        checkpoint,
        unshipped,
        oldest,
        interrupted,
        truncated,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail on the spot")]
    use super::*;

    fn group(payloads: &[&[u8]]) -> Vec<u8> {
        let mut buf = Vec::new();
        for payload in payloads {
            frame(&mut buf, |b| b.extend_from_slice(payload));
        }
        seal(&mut buf);
        buf
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn a_torn_or_zeroed_tail_is_never_read_as_an_entry() {
        let data = group(&[b"\x01one", b"\x01two", b"\x01three"]);
        let (entries, end, tail) = parse(&data);
        assert_eq!((entries.len(), end, tail), (3, data.len(), Tail::Clean));
        let whole = entries[1].end;
        // Cut anywhere inside the last entry: the first two survive, the rest is torn.
        for cut in whole + 1..data.len() {
            let (entries, end, tail) = parse(&data[..cut]);
            assert_eq!(
                (entries.len(), end, tail),
                (2, whole, Tail::Incomplete),
                "cut {cut}"
            );
        }
        // Zeros after the last entry (a crash that extended the file but lost its data).
        let mut zeroed = data.clone();
        zeroed.extend_from_slice(&[0; 64]);
        assert_eq!(parse(&zeroed).1, data.len());
        assert_eq!(parse(&zeroed).2, Tail::Invalid);
        // One flipped bit in a payload.
        let mut flipped = data.clone();
        flipped[whole + ENTRY_HEADER + 2] ^= 0x10;
        assert_eq!(parse(&flipped).0.len(), 2);
        assert_eq!(parse(&flipped).2, Tail::Invalid);
        assert_eq!(count_kinds(&data), (3, 0));
    }

    #[test]
    fn checkpoint_round_trips_and_rejects_damage() {
        let mut marker = Vec::new();
        codec::encode_started(
            &mut marker,
            5,
            &codec::StartedRequest {
                request_id: Uuid::now_v7(),
                received_at: time::OffsetDateTime::UNIX_EPOCH,
                project: None,
                key_id: None,
                tags: "{}",
                alias: None,
                streamed: false,
            },
        );
        let id = codec::peek(&marker).unwrap().request_id;
        let checkpoint = Checkpoint {
            pos: Pos { seq: 3, off: 99 },
            open: OpenStarts::from([(
                id,
                OpenStart {
                    spooled_at: 5,
                    payload: marker,
                },
            )]),
        };
        let bytes = checkpoint.encode();
        assert_eq!(Checkpoint::decode(&bytes), Some(checkpoint));
        for i in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 1;
            assert_eq!(Checkpoint::decode(&damaged), None, "byte {i}");
        }
        assert_eq!(Checkpoint::decode(&bytes[..bytes.len() - 1]), None);
    }

    #[test]
    fn recovery_truncates_a_torn_tail_and_appends_to_a_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = SegmentWriter::create(dir.path(), 1).unwrap();
        let mut record = Vec::new();
        codec::encode_record(
            &mut record,
            Kind::Finished,
            1,
            &crate::record::UsageRecord {
                request_id: Uuid::now_v7(),
                created_at: time::OffsetDateTime::UNIX_EPOCH,
                project: None,
                key_id: None,
                tags: "{}".into(),
                alias: None,
                provider: None,
                upstream_model: None,
                attempts: 1,
                status: 200,
                error_type: None,
                input_tokens: None,
                output_tokens: None,
                cached_tokens: None,
                reasoning_tokens: None,
                usage_source: None,
                elapsed_ms: 1.0,
                ttft_ms: None,
                streamed: false,
                client_aborted: false,
                vendor_response_id: None,
                vendor_request_id: None,
                cache_write_tokens: None,
                cost: None,
            },
        );
        let good = group(&[&record, &record]);
        writer.append(&good, u64::MAX).unwrap();
        drop(writer);
        // A torn third entry: its header and half its payload.
        let torn = group(&[&record]);
        let path = segment_path(dir.path(), 1);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&torn[..torn.len() / 2]).unwrap();
        drop(file);

        let recovered = recover(dir.path(), 0).unwrap();
        assert_eq!(recovered.unshipped, 2);
        assert_eq!(recovered.truncated, (torn.len() / 2) as u64);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            SEGMENT_HEADER + good.len() as u64
        );
        assert_eq!(recovered.writer.seq, 2);
        assert_eq!(recovered.segments.len(), 2);
        // The lock is held: a second opener is refused until this one lets go.
        assert!(matches!(recover(dir.path(), 0), Err(SpoolError::Locked(_))));
        drop(recovered);
        let again = recover(dir.path(), 0).unwrap();
        assert_eq!((again.unshipped, again.truncated), (2, 0));
    }
}
