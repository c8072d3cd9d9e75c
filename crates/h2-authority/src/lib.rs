//! I/O adapter that makes kubelet-style `:authority` values acceptable to h2.
//!
//! The kubelet's plugin watcher dials the registration socket with grpc-go, which derives
//! `:authority` from the socket path by percent-encoding it
//! (`%2Fvar%2Flib%2Fkubelet%2Fplugins_registry%2Fx-reg.sock`). h2 parses `:authority`
//! with the `http` crate, rejects the `%` and resets the stream, so no handler runs.
//!
//! [`AuthorityFixStream`] sits between the accepted socket and the server. It parses the
//! client→server HTTP/2 frames, HPACK-decodes every header block (tracking the client's
//! dynamic table), replaces an `:authority` that `http::uri::Authority` rejects with
//! `localhost`, and re-encodes every block with literals *without indexing*. Because the
//! re-encoded blocks never add entries, the server's HPACK table stays empty and can never
//! disagree with what the client believes; that is also why every block must be
//! re-encoded once one has been (the client's later blocks reference its own table).
//! All other frames and the server→client direction pass through untouched, so flow
//! control is unaffected.

#![warn(missing_docs)]

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Authority substituted for one the `http` crate rejects.
pub const REPLACEMENT_AUTHORITY: &str = "localhost";

/// Length of an HTTP/2 frame header.
pub const FRAME_HEADER_LEN: usize = 9;

/// Largest frame payload we emit: the HTTP/2 default `SETTINGS_MAX_FRAME_SIZE`, which h2
/// also uses to bound the number of CONTINUATION frames it accepts per block.
pub const MAX_FRAME_PAYLOAD: usize = 16_384;

/// Largest header list, counted as RFC 7541 §4.1 does (name + value + 32 per field), that
/// the server behind the adapter accepts: hyper's default, which the kubelet plugin's
/// servers also set explicitly. h2 refuses a longer list by resetting the stream, so the
/// adapter forwards a block only up to the field that crosses this size.
pub const MAX_HEADER_LIST_SIZE: usize = 16 << 10;

/// Decoded size of one block past which h2 closes the connection
/// (`MAX_HEADER_LIST_ABUSE_MULTIPLIER` times the list size); the adapter does the same
/// instead of expanding an HPACK bomb.
pub const HEADER_LIST_ABUSE_SIZE: usize = 4 * MAX_HEADER_LIST_SIZE;

/// CONTINUATION frames without END_HEADERS that h2 accepts in one block for these limits
/// (its `calc_max_continuation_frames`); one more is a CONTINUATION flood.
pub const MAX_CONTINUATIONS: usize = max_continuations(MAX_HEADER_LIST_SIZE, MAX_FRAME_PAYLOAD);

/// HPACK dynamic table size the server advertises (the HTTP/2 default); h2 refuses a
/// table size update beyond it, and so does the adapter's decoder.
pub const HEADER_TABLE_SIZE: usize = 4096;

const fn max_continuations(list: usize, frame: usize) -> usize {
    let frames = if list / frame > 1 { list / frame } else { 1 };
    let padded = frames + (frames >> 2);
    if padded > 5 { padded } else { 5 }
}

/// Frame type DATA.
pub const TYPE_DATA: u8 = 0x0;
/// Frame type HEADERS.
pub const TYPE_HEADERS: u8 = 0x1;
/// Frame type RST_STREAM.
pub const TYPE_RST_STREAM: u8 = 0x3;
/// Frame type SETTINGS.
pub const TYPE_SETTINGS: u8 = 0x4;
/// Frame type PING.
pub const TYPE_PING: u8 = 0x6;
/// Frame type GOAWAY.
pub const TYPE_GOAWAY: u8 = 0x7;
/// Frame type CONTINUATION.
pub const TYPE_CONTINUATION: u8 = 0x9;

/// Flag END_STREAM (DATA, HEADERS).
pub const FLAG_END_STREAM: u8 = 0x1;
/// Flag ACK (SETTINGS, PING).
pub const FLAG_ACK: u8 = 0x1;
/// Flag END_HEADERS (HEADERS, CONTINUATION).
pub const FLAG_END_HEADERS: u8 = 0x4;
/// Flag PADDED (DATA, HEADERS).
pub const FLAG_PADDED: u8 = 0x8;
/// Flag PRIORITY (HEADERS).
pub const FLAG_PRIORITY: u8 = 0x20;

/// Why the adapter gave up on a connection (surfaced to h2 as `InvalidData`).
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    /// A header block could not be HPACK-decoded.
    #[error("HPACK-decoding the header block of stream {stream_id}: {source}")]
    Hpack {
        /// Stream of the block.
        stream_id: u32,
        /// Why the HPACK decoder rejected the block.
        source: loona_hpack::decoder::DecoderError,
    },
    /// A header block was interrupted by a frame other than its CONTINUATION.
    #[error(
        "expected CONTINUATION for stream {stream_id}, got frame type {frame_type} on stream {got_stream_id}"
    )]
    ExpectedContinuation {
        /// Stream whose header block is open.
        stream_id: u32,
        /// Type of the frame received instead.
        frame_type: u8,
        /// Stream of the frame received instead.
        got_stream_id: u32,
    },
    /// A HEADERS frame's padding or priority fields exceed its payload.
    #[error("malformed HEADERS frame on stream {stream_id}: padding/priority exceed payload")]
    MalformedHeaders {
        /// Stream of the frame.
        stream_id: u32,
    },
    /// A frame announced a payload longer than the server's `SETTINGS_MAX_FRAME_SIZE`
    /// (h2 answers FRAME_SIZE_ERROR); refused before its payload is buffered.
    #[error(
        "frame of {len} bytes on stream {stream_id} exceeds the {MAX_FRAME_PAYLOAD}-byte maximum"
    )]
    FrameTooLarge {
        /// Stream of the frame.
        stream_id: u32,
        /// Payload length the frame header announced.
        len: usize,
    },
    /// A header block went on for more CONTINUATION frames than h2 accepts.
    #[error("header block of stream {stream_id} exceeds {MAX_CONTINUATIONS} CONTINUATION frames")]
    TooManyContinuations {
        /// Stream of the block.
        stream_id: u32,
    },
    /// A header block decoded to more than [`HEADER_LIST_ABUSE_SIZE`] bytes.
    #[error(
        "header block of stream {stream_id} decodes to more than {HEADER_LIST_ABUSE_SIZE} bytes"
    )]
    HeaderListWayTooLarge {
        /// Stream of the block.
        stream_id: u32,
    },
    /// A dynamic-table size update had a malformed integer.
    #[error("malformed HPACK dynamic table size update on stream {stream_id}")]
    MalformedSizeUpdate {
        /// Stream of the block.
        stream_id: u32,
    },
}

/// Appends an HTTP/2 frame header.
pub fn put_frame_header(out: &mut Vec<u8>, len: usize, ty: u8, flags: u8, stream_id: u32) {
    // Payload lengths are at most 2^24-1 by construction (we never emit more than
    // MAX_FRAME_PAYLOAD), so the truncation to 24 bits is lossless.
    let len = len as u32;
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags]);
    out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
}

/// Appends an HPACK integer with an `prefix_bits`-bit prefix (RFC 7541 §5.1); `high`
/// holds the representation's pattern bits above the prefix.
pub fn encode_hpack_integer(out: &mut Vec<u8>, mut value: usize, prefix_bits: u8, high: u8) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        out.push(high | value as u8);
        return;
    }
    out.push(high | max_prefix as u8);
    value -= max_prefix;
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Decodes an HPACK integer; returns the value and the number of bytes consumed.
fn decode_hpack_integer(buf: &[u8], prefix_bits: u8) -> Option<(usize, usize)> {
    let max_prefix = (1usize << prefix_bits) - 1;
    let first = *buf.first()? as usize & max_prefix;
    if first < max_prefix {
        return Some((first, 1));
    }
    let mut value = max_prefix;
    let mut shift = 0u32;
    for (i, b) in buf.iter().enumerate().skip(1) {
        // Anything beyond 4 continuation bytes exceeds every sane table size.
        if shift > 28 {
            return None;
        }
        value = value.checked_add(((b & 0x7f) as usize) << shift)?;
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
        shift += 7;
    }
    None
}

/// Appends one header as "literal without indexing, new name" (RFC 7541 §6.2.2) with
/// raw (non-Huffman) strings: it never touches the receiver's dynamic table.
pub fn encode_literal_without_indexing(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    encode_hpack_integer(out, name.len(), 7, 0x00);
    out.extend_from_slice(name);
    encode_hpack_integer(out, value.len(), 7, 0x00);
    out.extend_from_slice(value);
}

/// Returns the dynamic-table size updates at the start of a block (RFC 7541 §4.2 allows
/// them only there). loona-hpack applies them without reporting them, and we must forward
/// them so the server's decoder sees the same table limits the client announced.
fn leading_size_updates(block: &[u8], stream_id: u32) -> Result<Vec<usize>, AuthorityError> {
    let mut sizes = Vec::new();
    let mut pos = 0;
    while pos < block.len() && block[pos] & 0xe0 == 0x20 {
        let (size, used) = decode_hpack_integer(&block[pos..], 5)
            .ok_or(AuthorityError::MalformedSizeUpdate { stream_id })?;
        sizes.push(size);
        pos += used;
    }
    Ok(sizes)
}

/// Whether h2 would accept this `:authority` value.
pub fn authority_is_acceptable(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// A header block being assembled from HEADERS + CONTINUATION frames.
struct OpenBlock {
    stream_id: u32,
    end_stream: bool,
    fragment: Vec<u8>,
    /// CONTINUATION frames without END_HEADERS received so far.
    continuations: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Still comparing the first bytes with the preface.
    Preface,
    /// Parsing frames.
    Frames,
    /// Not HTTP/2 with prior knowledge: forward verbatim.
    Passthrough,
}

/// Synchronous client→server rewriter: feed it raw bytes in any fragmentation and it
/// appends the rewritten byte stream to an output buffer.
pub struct HeaderRewriter {
    mode: Mode,
    /// Bytes received but not yet forming a complete frame (or the preface).
    pending: Vec<u8>,
    open: Option<OpenBlock>,
    decoder: loona_hpack::Decoder<'static>,
    replaced: u64,
    blocks: u64,
    /// Bytes of header fields checked or re-encoded (see [`HeaderRewriter::header_work`]).
    work: u64,
}

impl Default for HeaderRewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderRewriter {
    /// A rewriter for a fresh connection.
    pub fn new() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Self {
            mode: Mode::Preface,
            pending: Vec::new(),
            open: None,
            decoder,
            replaced: 0,
            blocks: 0,
            work: 0,
        }
    }

    /// Number of `:authority` values replaced so far.
    pub fn replaced_authorities(&self) -> u64 {
        self.replaced
    }

    /// Number of header blocks re-encoded so far.
    pub fn rewritten_blocks(&self) -> u64 {
        self.blocks
    }

    /// Bytes of header names and values parsed as `:authority` or re-encoded so far:
    /// the part of the adapter's cost that a block can amplify through references to
    /// the dynamic table, so tests and fuzzing can bound it (security review L1).
    pub fn header_work(&self) -> u64 {
        self.work
    }

    /// Whether the preface did not match and bytes are forwarded verbatim.
    pub fn is_passthrough(&self) -> bool {
        self.mode == Mode::Passthrough
    }

    /// Consumes `input` and appends whatever can already be forwarded to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), AuthorityError> {
        match self.mode {
            Mode::Passthrough => {
                out.extend_from_slice(input);
                return Ok(());
            }
            Mode::Preface => {
                self.pending.extend_from_slice(input);
                let n = self.pending.len().min(PREFACE.len());
                if self.pending[..n] != PREFACE[..n] {
                    self.mode = Mode::Passthrough;
                    out.append(&mut self.pending);
                    return Ok(());
                }
                if self.pending.len() < PREFACE.len() {
                    return Ok(());
                }
                out.extend_from_slice(PREFACE);
                self.pending.drain(..PREFACE.len());
                self.mode = Mode::Frames;
            }
            Mode::Frames => self.pending.extend_from_slice(input),
        }
        self.process_frames(out)
    }

    fn process_frames(&mut self, out: &mut Vec<u8>) -> Result<(), AuthorityError> {
        let mut pos = 0;
        let result = loop {
            let rest = &self.pending[pos..];
            if rest.len() < FRAME_HEADER_LEN {
                break Ok(());
            }
            let len = (rest[0] as usize) << 16 | (rest[1] as usize) << 8 | rest[2] as usize;
            if len > MAX_FRAME_PAYLOAD {
                break Err(AuthorityError::FrameTooLarge {
                    stream_id: u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]])
                        & 0x7fff_ffff,
                    len,
                });
            }
            let total = FRAME_HEADER_LEN + len;
            if rest.len() < total {
                break Ok(());
            }
            let frame = &self.pending[pos..pos + total];
            pos += total;
            // Borrow juggling: the frame is copied out only when it is a header frame.
            let ty = frame[3];
            let flags = frame[4];
            let stream_id =
                u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
            if let Some(open) = &self.open
                && (ty != TYPE_CONTINUATION || stream_id != open.stream_id)
            {
                break Err(AuthorityError::ExpectedContinuation {
                    stream_id: open.stream_id,
                    frame_type: ty,
                    got_stream_id: stream_id,
                });
            }
            match ty {
                TYPE_HEADERS => {
                    let payload = &frame[FRAME_HEADER_LEN..];
                    let mut start = 0;
                    let mut end = payload.len();
                    if flags & FLAG_PADDED != 0 {
                        let Some(&pad) = payload.first() else {
                            break Err(AuthorityError::MalformedHeaders { stream_id });
                        };
                        start = 1;
                        end = match end.checked_sub(pad as usize) {
                            Some(e) => e,
                            None => break Err(AuthorityError::MalformedHeaders { stream_id }),
                        };
                    }
                    if flags & FLAG_PRIORITY != 0 {
                        // Priority is advisory and h2 ignores it, so dropping it is safe.
                        start += 5;
                    }
                    if start > end {
                        break Err(AuthorityError::MalformedHeaders { stream_id });
                    }
                    self.open = Some(OpenBlock {
                        stream_id,
                        end_stream: flags & FLAG_END_STREAM != 0,
                        fragment: payload[start..end].to_vec(),
                        continuations: 0,
                    });
                    if flags & FLAG_END_HEADERS != 0
                        && let Err(e) = self.finish_block(out)
                    {
                        break Err(e);
                    }
                }
                TYPE_CONTINUATION if self.open.is_some() => {
                    if let Some(open) = self.open.as_mut() {
                        if flags & FLAG_END_HEADERS == 0 {
                            open.continuations += 1;
                            if open.continuations > MAX_CONTINUATIONS {
                                break Err(AuthorityError::TooManyContinuations { stream_id });
                            }
                        }
                        open.fragment.extend_from_slice(&frame[FRAME_HEADER_LEN..]);
                    }
                    if flags & FLAG_END_HEADERS != 0
                        && let Err(e) = self.finish_block(out)
                    {
                        break Err(e);
                    }
                }
                // Everything else (including a stray CONTINUATION, which h2 will reject
                // itself) is forwarded byte for byte.
                _ => out.extend_from_slice(&self.pending[pos - total..pos]),
            }
        };
        self.pending.drain(..pos);
        result
    }

    /// Decodes the completed block, fixes `:authority` and emits the re-encoded frames.
    fn finish_block(&mut self, out: &mut Vec<u8>) -> Result<(), AuthorityError> {
        let Some(block) = self.open.take() else {
            return Ok(());
        };
        let stream_id = block.stream_id;
        let sizes = leading_size_updates(&block.fragment, stream_id)?;
        let mut encoded = Vec::with_capacity(block.fragment.len() * 2);
        for size in sizes {
            encode_hpack_integer(&mut encoded, size, 5, 0x20);
        }
        let mut replaced = 0;
        let mut list_size = 0usize;
        let mut cut = 0usize;
        let mut work = 0usize;
        // The whole block is decoded even past the limits: the dynamic table is
        // connection state, and h2 decodes on for the same reason. Only the fields up
        // to the one crossing the list limit are checked and re-encoded, so a block of
        // references to one large table entry costs O(1) per reference after that
        // (security review L1). Sizes past the limit count the value as received.
        self.decoder
            .decode_with_cb(&block.fragment, |name: Cow<[u8]>, value: Cow<[u8]>| {
                if list_size > HEADER_LIST_ABUSE_SIZE {
                    // The connection is closed after this block: nothing more to count.
                    return;
                }
                if list_size >= MAX_HEADER_LIST_SIZE {
                    cut += 1;
                    list_size = list_size.saturating_add(name.len() + value.len() + 32);
                    return;
                }
                let value: &[u8] = if name.as_ref() == b":authority" {
                    work = work.saturating_add(value.len());
                    if authority_is_acceptable(&value) {
                        &value
                    } else {
                        replaced += 1;
                        REPLACEMENT_AUTHORITY.as_bytes()
                    }
                } else {
                    &value
                };
                // Up to the field that crosses the limit, so h2 still sees a list over
                // its size and refuses the stream, without the rest being expanded.
                work = work.saturating_add(name.len() + value.len());
                encode_literal_without_indexing(&mut encoded, &name, value);
                list_size = list_size.saturating_add(name.len() + value.len() + 32);
            })
            .map_err(|source| AuthorityError::Hpack { stream_id, source })?;
        self.work = self
            .work
            .saturating_add(u64::try_from(work).unwrap_or(u64::MAX));
        if list_size > HEADER_LIST_ABUSE_SIZE {
            return Err(AuthorityError::HeaderListWayTooLarge { stream_id });
        }
        if replaced > 0 {
            tracing::debug!(stream_id, "replaced an :authority h2 would reject");
        }
        if cut > 0 {
            tracing::debug!(stream_id, cut, "header list over the server's limit: cut");
        }
        self.replaced += replaced;
        self.blocks += 1;
        emit_header_block(out, stream_id, block.end_stream, &encoded);
        Ok(())
    }
}

/// Emits a header block as HEADERS + CONTINUATION frames of at most
/// [`MAX_FRAME_PAYLOAD`] bytes each.
pub fn emit_header_block(out: &mut Vec<u8>, stream_id: u32, end_stream: bool, block: &[u8]) {
    let mut chunks = block.chunks(MAX_FRAME_PAYLOAD).peekable();
    let mut first = true;
    // An empty block still needs one HEADERS frame.
    if block.is_empty() {
        let flags = FLAG_END_HEADERS | if end_stream { FLAG_END_STREAM } else { 0 };
        put_frame_header(out, 0, TYPE_HEADERS, flags, stream_id);
        return;
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let (ty, mut flags) = if first {
            (TYPE_HEADERS, if end_stream { FLAG_END_STREAM } else { 0 })
        } else {
            (TYPE_CONTINUATION, 0)
        };
        if last {
            flags |= FLAG_END_HEADERS;
        }
        put_frame_header(out, chunk.len(), ty, flags, stream_id);
        out.extend_from_slice(chunk);
        first = false;
    }
}

/// `AsyncRead + AsyncWrite` wrapper over an accepted connection that rewrites client
/// header blocks with a [`HeaderRewriter`]; writes go to the inner stream unchanged.
pub struct AuthorityFixStream<T> {
    inner: T,
    rewriter: HeaderRewriter,
    /// Rewritten bytes not yet handed to the reader.
    out: Vec<u8>,
    out_pos: usize,
    scratch: Box<[u8]>,
    eof: bool,
    /// Once the rewriter fails the byte stream is unusable; report it on every read.
    failed: Option<String>,
}

impl<T> AuthorityFixStream<T> {
    /// Wraps an accepted connection.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            rewriter: HeaderRewriter::new(),
            out: Vec::new(),
            out_pos: 0,
            scratch: vec![0u8; 16 * 1024].into_boxed_slice(),
            eof: false,
            failed: None,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The rewriter state (counters for diagnostics and tests).
    pub fn rewriter(&self) -> &HeaderRewriter {
        &self.rewriter
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for AuthorityFixStream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.out_pos < this.out.len() {
                let n = (this.out.len() - this.out_pos).min(buf.remaining());
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(msg) = &this.failed {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, msg.clone())));
            }
            if this.eof {
                // Any incomplete frame left in the rewriter is dropped: the peer is gone.
                return Poll::Ready(Ok(()));
            }
            if this.rewriter.is_passthrough() {
                // Nothing to rewrite any more: read straight into the caller's buffer.
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut rb = ReadBuf::new(&mut this.scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let data = rb.filled();
                    if data.is_empty() {
                        this.eof = true;
                        continue;
                    }
                    if let Err(e) = this.rewriter.feed(data, &mut this.out) {
                        tracing::warn!(error = %e, "authority adapter: closing connection");
                        this.failed = Some(e.to_string());
                    }
                    // Loop: either forward output, report the failure, or read again
                    // (a partial frame produced nothing yet; returning Ready with no bytes
                    // would look like EOF).
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AuthorityFixStream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(feature = "tonic")]
impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFixStream<T>
{
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Headers = Vec<(Vec<u8>, Vec<u8>)>;

    fn req_headers(authority: &str, path: &str) -> Headers {
        vec![
            (b":method".to_vec(), b"POST".to_vec()),
            (b":scheme".to_vec(), b"http".to_vec()),
            (b":path".to_vec(), path.as_bytes().to_vec()),
            (b":authority".to_vec(), authority.as_bytes().to_vec()),
            (b"content-type".to_vec(), b"application/grpc".to_vec()),
            (b"te".to_vec(), b"trailers".to_vec()),
        ]
    }

    /// A parsed output frame.
    #[derive(Debug)]
    struct Frame {
        ty: u8,
        flags: u8,
        stream_id: u32,
        payload: Vec<u8>,
    }

    fn parse_frames(mut b: &[u8]) -> Vec<Frame> {
        let mut v = Vec::new();
        while !b.is_empty() {
            let len = (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize;
            v.push(Frame {
                ty: b[3],
                flags: b[4],
                stream_id: u32::from_be_bytes([b[5], b[6], b[7], b[8]]),
                payload: b[9..9 + len].to_vec(),
            });
            b = &b[9 + len..];
        }
        v
    }

    /// Reassembles header blocks from output frames and decodes them with a fresh decoder,
    /// as h2 would; returns (stream, end_stream, headers) per block plus pass-through frames.
    fn decode_output(out: &[u8]) -> (Vec<(u32, bool, Headers)>, Vec<Frame>) {
        assert_eq!(&out[..24], PREFACE);
        let mut dec = loona_hpack::Decoder::new();
        let mut blocks = Vec::new();
        let mut others = Vec::new();
        let mut cur: Option<(u32, bool, Vec<u8>)> = None;
        for f in parse_frames(&out[24..]) {
            assert!(f.payload.len() <= MAX_FRAME_PAYLOAD);
            match f.ty {
                TYPE_HEADERS => {
                    assert!(cur.is_none());
                    assert_eq!(f.flags & (FLAG_PADDED | FLAG_PRIORITY), 0);
                    cur = Some((f.stream_id, f.flags & FLAG_END_STREAM != 0, f.payload));
                }
                TYPE_CONTINUATION => cur.as_mut().unwrap().2.extend(f.payload),
                _ => {
                    assert!(cur.is_none());
                    others.push(f);
                    continue;
                }
            }
            if f.flags & FLAG_END_HEADERS != 0 {
                let (sid, es, block) = cur.take().unwrap();
                // Re-encoded blocks must never use or touch the dynamic table.
                let mut i = 0;
                while i < block.len() && block[i] & 0xe0 == 0x20 {
                    i += decode_hpack_integer(&block[i..], 5).unwrap().1;
                }
                assert!(block[i..].first().is_none_or(|b| *b == 0x00));
                blocks.push((sid, es, dec.decode(&block).unwrap()));
            }
        }
        (blocks, others)
    }

    fn frame(ty: u8, flags: u8, sid: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        put_frame_header(&mut v, payload.len(), ty, flags, sid);
        v.extend_from_slice(payload);
        v
    }

    fn pairs(h: &Headers) -> Vec<(&[u8], &[u8])> {
        h.iter().map(|(n, v)| (&n[..], &v[..])).collect()
    }

    /// A client stream with three requests on one connection, using loona's indexing
    /// encoder so later requests reference the dynamic table, plus padding, priority,
    /// CONTINUATION and non-header frames.
    fn client_stream() -> (Vec<u8>, Vec<Headers>) {
        let mut enc = loona_hpack::Encoder::new();
        let mut s = PREFACE.to_vec();
        s.extend(frame(TYPE_SETTINGS, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]));
        let bad = "%2Fvar%2Flib%2Fkubelet%2Fplugins_registry%2Fx-reg.sock";
        let reqs = vec![
            req_headers(bad, "/pluginregistration.Registration/GetInfo"),
            req_headers(
                bad,
                "/pluginregistration.Registration/NotifyRegistrationStatus",
            ),
            req_headers("localhost", "/pluginregistration.Registration/GetInfo"),
        ];
        // Request 1: plain HEADERS.
        let b1 = enc.encode(pairs(&reqs[0]));
        s.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &b1));
        s.extend(frame(TYPE_DATA, FLAG_END_STREAM, 1, &[0, 0, 0, 0, 0]));
        // Request 2: PADDED + PRIORITY, split across CONTINUATION; mostly table references.
        let b2 = enc.encode(pairs(&reqs[1]));
        let (a, b) = b2.split_at(b2.len() / 2);
        let mut p = vec![3u8, 0, 0, 0, 0, 16];
        p.extend_from_slice(a);
        p.extend_from_slice(&[0, 0, 0]);
        s.extend(frame(TYPE_HEADERS, FLAG_PADDED | FLAG_PRIORITY, 3, &p));
        s.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, b));
        s.extend(frame(TYPE_DATA, FLAG_END_STREAM, 3, &[0, 0, 0, 0, 2, 8, 1]));
        // Request 3: fully indexed except the new authority, END_STREAM on HEADERS.
        let b3 = enc.encode(pairs(&reqs[2]));
        s.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            5,
            &b3,
        ));
        s.extend(frame(TYPE_PING, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]));
        (s, reqs)
    }

    fn expected(reqs: &[Headers]) -> Vec<Headers> {
        reqs.iter()
            .map(|h| {
                h.iter()
                    .map(|(n, v)| {
                        if n == b":authority" && !authority_is_acceptable(v) {
                            (n.clone(), b"localhost".to_vec())
                        } else {
                            (n.clone(), v.clone())
                        }
                    })
                    .collect()
            })
            .collect()
    }

    fn check(out: &[u8], reqs: &[Headers]) {
        let (blocks, others) = decode_output(out);
        let want = expected(reqs);
        assert_eq!(blocks.len(), 3);
        for (i, (sid, _, h)) in blocks.iter().enumerate() {
            assert_eq!(*sid, 1 + 2 * i as u32);
            assert_eq!(h, &want[i]);
        }
        assert!(blocks[2].1 && !blocks[0].1 && !blocks[1].1);
        let kinds: Vec<u8> = others.iter().map(|f| f.ty).collect();
        assert_eq!(kinds, vec![TYPE_SETTINGS, TYPE_DATA, TYPE_DATA, TYPE_PING]);
        assert_eq!(others[2].payload, vec![0, 0, 0, 0, 2, 8, 1]);
    }

    #[test]
    fn rewrites_whole_stream() {
        let (s, reqs) = client_stream();
        let mut rw = HeaderRewriter::new();
        let mut out = Vec::new();
        rw.feed(&s, &mut out).unwrap();
        check(&out, &reqs);
        assert_eq!(rw.replaced_authorities(), 2);
        assert_eq!(rw.rewritten_blocks(), 3);
    }

    #[test]
    fn rewrites_byte_by_byte() {
        let (s, reqs) = client_stream();
        let mut rw = HeaderRewriter::new();
        let mut out = Vec::new();
        for b in &s {
            rw.feed(std::slice::from_ref(b), &mut out).unwrap();
        }
        check(&out, &reqs);
    }

    #[test]
    fn rewrites_with_odd_chunks() {
        let (s, reqs) = client_stream();
        for chunk in [2, 7, 9, 10, 23, 25, 64] {
            let mut rw = HeaderRewriter::new();
            let mut out = Vec::new();
            for c in s.chunks(chunk) {
                rw.feed(c, &mut out).unwrap();
            }
            check(&out, &reqs);
        }
    }

    #[test]
    fn non_http2_passes_through() {
        let input = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut rw = HeaderRewriter::new();
        let mut out = Vec::new();
        for c in input.chunks(3) {
            rw.feed(c, &mut out).unwrap();
        }
        assert_eq!(out, input);
        assert!(rw.is_passthrough());
    }

    #[test]
    fn partial_preface_is_held_back() {
        let mut rw = HeaderRewriter::new();
        let mut out = Vec::new();
        rw.feed(&PREFACE[..10], &mut out).unwrap();
        assert!(out.is_empty());
        rw.feed(&PREFACE[10..], &mut out).unwrap();
        assert_eq!(out, PREFACE);
    }

    #[test]
    fn large_block_is_split_into_continuations() {
        let mut enc = loona_hpack::Encoder::new();
        let mut h = req_headers("%2Fx", "/p");
        h.push((b"x-big".to_vec(), vec![b'a'; 40_000]));
        let mut s = PREFACE.to_vec();
        let block = enc.encode(pairs(&h));
        // The client itself splits at 16384 too.
        let mut first = true;
        let mut chunks = block.chunks(MAX_FRAME_PAYLOAD).peekable();
        while let Some(c) = chunks.next() {
            let flags = if chunks.peek().is_none() {
                FLAG_END_HEADERS
            } else {
                0
            };
            let ty = if first {
                TYPE_HEADERS
            } else {
                TYPE_CONTINUATION
            };
            s.extend(frame(ty, flags, 1, c));
            first = false;
        }
        let mut rw = HeaderRewriter::new();
        let mut out = Vec::new();
        rw.feed(&s, &mut out).unwrap();
        let frames = parse_frames(&out[24..]);
        assert!(frames.len() >= 3);
        assert!(frames.iter().all(|f| f.payload.len() <= MAX_FRAME_PAYLOAD));
        assert_eq!(frames[0].ty, TYPE_HEADERS);
        assert!(frames[1..].iter().all(|f| f.ty == TYPE_CONTINUATION));
        let (blocks, _) = decode_output(&out);
        assert_eq!(blocks[0].2[3].1, b"localhost");
        assert_eq!(blocks[0].2[6].1.len(), 40_000);
    }

    #[test]
    fn size_update_is_forwarded() {
        let mut block = Vec::new();
        encode_hpack_integer(&mut block, 100, 5, 0x20);
        block.extend(loona_hpack::Encoder::new().encode(pairs(&req_headers("%2Fy", "/p"))));
        let mut s = PREFACE.to_vec();
        s.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        let mut rw = HeaderRewriter::new();
        let mut out = Vec::new();
        rw.feed(&s, &mut out).unwrap();
        let frames = parse_frames(&out[24..]);
        assert_eq!(decode_hpack_integer(&frames[0].payload, 5), Some((100, 2)));
        assert_eq!(frames[0].payload[0] & 0xe0, 0x20);
    }

    #[test]
    fn interrupted_block_is_an_error() {
        let mut s = PREFACE.to_vec();
        s.extend(frame(TYPE_HEADERS, 0, 1, &[0x82]));
        s.extend(frame(TYPE_DATA, 0, 1, &[]));
        let mut out = Vec::new();
        assert!(matches!(
            HeaderRewriter::new().feed(&s, &mut out),
            Err(AuthorityError::ExpectedContinuation { stream_id: 1, .. })
        ));
    }

    #[test]
    fn integer_round_trip() {
        for v in [0usize, 1, 30, 31, 126, 127, 128, 1337, 16_384, 1 << 20] {
            for prefix in [4u8, 5, 7] {
                let mut b = Vec::new();
                encode_hpack_integer(&mut b, v, prefix, 0);
                assert_eq!(decode_hpack_integer(&b, prefix), Some((v, b.len())));
            }
        }
    }

    #[test]
    fn authority_check_matches_http_crate() {
        assert!(authority_is_acceptable(b"localhost"));
        assert!(authority_is_acceptable(b"localhost:50051"));
        assert!(!authority_is_acceptable(b"%2Fvar%2Flib%2Fx.sock"));
        assert!(!authority_is_acceptable(b"/tmp/x.sock"));
    }

    fn fed(stream: &[u8]) -> (Result<(), AuthorityError>, Vec<u8>) {
        let mut out = Vec::new();
        let result = HeaderRewriter::new().feed(stream, &mut out);
        (result, out)
    }

    #[test]
    fn a_frame_longer_than_the_server_accepts_is_refused_at_its_header() {
        // 16 MiB announced: refused from the 9-byte header, before any payload is buffered.
        let mut s = PREFACE.to_vec();
        put_frame_header(&mut s, (1 << 24) - 1, TYPE_DATA, 0, 1);
        let (result, out) = fed(&s);
        assert!(
            matches!(result, Err(AuthorityError::FrameTooLarge { len, .. }) if len == (1 << 24) - 1),
            "{result:?}"
        );
        assert_eq!(out, PREFACE);
        // The largest frame the server accepts still passes.
        let mut s = PREFACE.to_vec();
        s.extend(frame(TYPE_DATA, 0, 1, &[7; MAX_FRAME_PAYLOAD]));
        let (result, out) = fed(&s);
        assert!(result.is_ok());
        assert_eq!(out, s);
    }

    /// HEADERS without END_HEADERS, then `n` CONTINUATIONs, the last one ending the block
    /// when `end` is set.
    fn continued_block(n: usize, end: bool) -> Vec<u8> {
        let block = loona_hpack::Encoder::new().encode(pairs(&req_headers("%2Fz", "/p")));
        let mut s = PREFACE.to_vec();
        s.extend(frame(TYPE_HEADERS, 0, 1, &block));
        for i in 0..n {
            let flags = if end && i + 1 == n {
                FLAG_END_HEADERS
            } else {
                0
            };
            s.extend(frame(TYPE_CONTINUATION, flags, 1, &[]));
        }
        s
    }

    #[test]
    fn a_continuation_flood_is_refused_where_h2_refuses_it() {
        // h2 with a 16 KiB list and 16 KiB frames allows five CONTINUATIONs without
        // END_HEADERS per block (calc_max_continuation_frames), and so does the adapter.
        let (result, out) = fed(&continued_block(MAX_CONTINUATIONS + 1, true));
        assert!(result.is_ok(), "{result:?}");
        let (blocks, _) = decode_output(&out);
        assert_eq!(blocks[0].2[3].1, b"localhost");
        let (result, _) = fed(&continued_block(MAX_CONTINUATIONS, false));
        assert!(result.is_ok(), "{result:?}");
        let (result, out) = fed(&continued_block(MAX_CONTINUATIONS + 1, false));
        assert!(
            matches!(
                result,
                Err(AuthorityError::TooManyContinuations { stream_id: 1, .. })
            ),
            "{result:?}"
        );
        assert_eq!(out, PREFACE);
    }

    /// A block that adds one `size`-byte value to the dynamic table and then references
    /// it `refs` more times, one byte per reference.
    fn table_bomb(size: usize, refs: usize) -> Vec<u8> {
        let mut block = vec![0x40];
        encode_hpack_integer(&mut block, 3, 7, 0);
        block.extend_from_slice(b"x-a");
        encode_hpack_integer(&mut block, size, 7, 0);
        block.resize(block.len() + size, b'a');
        // Index 62: the newest dynamic-table entry.
        block.resize(block.len() + refs, 0x80 | 62);
        let mut s = PREFACE.to_vec();
        s.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        s
    }

    #[test]
    fn an_hpack_bomb_is_refused_not_expanded() {
        // 5 KB of input that decodes to 30 headers of 3 KB: more than h2's abuse bound
        // (four times the list size), where h2 answers GOAWAY.
        let (result, out) = fed(&table_bomb(3000, 29));
        assert!(
            matches!(
                result,
                Err(AuthorityError::HeaderListWayTooLarge { stream_id: 1, .. })
            ),
            "{result:?}"
        );
        assert_eq!(out, PREFACE, "nothing of the block is forwarded");
    }

    /// L1 (security review): a block of HEADERS + the most CONTINUATIONs h2 accepts,
    /// filled with 1-byte references to a 4000-byte `:authority` in the dynamic table.
    /// Past the header-list limit each reference must cost O(1): the work stays within
    /// one full header list per block plus the input size, instead of 4000 bytes of
    /// authority parsing per input byte.
    #[test]
    fn authority_references_past_the_list_limit_cost_no_parsing() {
        let mut block = vec![0x41]; // literal with indexing, name = static 1 (:authority)
        encode_hpack_integer(&mut block, 4000, 7, 0);
        block.resize(block.len() + 4000, b'a');
        let frames = MAX_CONTINUATIONS + 2;
        block.resize(frames * MAX_FRAME_PAYLOAD, 0x80 | 62);
        let mut s = PREFACE.to_vec();
        let chunks: Vec<&[u8]> = block.chunks(MAX_FRAME_PAYLOAD).collect();
        for (i, c) in chunks.iter().enumerate() {
            let ty = if i == 0 {
                TYPE_HEADERS
            } else {
                TYPE_CONTINUATION
            };
            let flags = if i + 1 == chunks.len() {
                FLAG_END_HEADERS
            } else {
                0
            };
            s.extend(frame(ty, flags, 1, c));
        }
        let mut rw = HeaderRewriter::new();
        let mut out = Vec::new();
        let result = rw.feed(&s, &mut out);
        assert!(
            matches!(
                result,
                Err(AuthorityError::HeaderListWayTooLarge { stream_id: 1 })
            ),
            "{result:?}"
        );
        let bound = 2 * (MAX_HEADER_LIST_SIZE + HEADER_TABLE_SIZE) + 2 * s.len();
        assert!(
            rw.header_work() <= bound as u64,
            "{} bytes of header work for {} input bytes (bound {bound})",
            rw.header_work(),
            s.len()
        );
    }

    #[test]
    fn an_over_size_block_is_cut_after_the_limit_so_h2_still_refuses_the_stream() {
        // 11 headers of 3035 bytes (RFC 7541 accounting): over the 16 KiB list h2
        // accepts but under its abuse bound, where h2 refuses only the stream.
        let (result, out) = fed(&table_bomb(3000, 10));
        assert!(result.is_ok(), "{result:?}");
        let (blocks, _) = decode_output(&out);
        let sizes: Vec<usize> = blocks[0]
            .2
            .iter()
            .map(|(n, v)| n.len() + v.len() + 32)
            .collect();
        let total: usize = sizes.iter().sum();
        // Forwarded up to and including the field that crosses the limit: h2 still
        // counts at least MAX_HEADER_LIST_SIZE, and no more than that is expanded.
        assert!(total >= MAX_HEADER_LIST_SIZE, "{total}");
        assert!(
            total - sizes[sizes.len() - 1] < MAX_HEADER_LIST_SIZE,
            "{total}"
        );
        assert_eq!(sizes.len(), 6);
    }

    #[test]
    fn a_table_size_beyond_what_the_server_advertises_is_refused() {
        let mut block = Vec::new();
        encode_hpack_integer(&mut block, HEADER_TABLE_SIZE + 1, 5, 0x20);
        block.extend(loona_hpack::Encoder::new().encode(pairs(&req_headers("%2Fy", "/p"))));
        let mut s = PREFACE.to_vec();
        s.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        let (result, _) = fed(&s);
        assert!(
            matches!(result, Err(AuthorityError::Hpack { stream_id: 1, .. })),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn async_adapter_over_fragmented_reads() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (s, reqs) = client_stream();
        let (mut client, server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for b in s.chunks(5) {
                client.write_all(b).await.unwrap();
                client.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            client.shutdown().await.unwrap();
        });
        let mut wrapped = AuthorityFixStream::new(server);
        let mut out = Vec::new();
        // A small read buffer exercises partial hand-out of rewritten bytes.
        let mut buf = [0u8; 7];
        loop {
            let n = wrapped.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        writer.await.unwrap();
        check(&out, &reqs);
        assert_eq!(wrapped.rewriter().replaced_authorities(), 2);
    }
}
