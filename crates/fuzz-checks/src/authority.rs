//! Target `authority`: the `:authority` adapter's HTTP/2 frame parser and
//! HPACK decoder, fed what any local process that reaches the plugin's
//! sockets can send.
//!
//! Input (structure-aware): one byte choosing how the stream is cut into
//! reads and whether it starts with the HTTP/2 preface, then operations, each
//! a kind byte and its arguments: a HEADERS block encoded by a stateful HPACK
//! encoder (dynamic-table references, a fuzzed `:authority`, optional
//! padding, priority and CONTINUATION split), a raw HEADERS or CONTINUATION
//! frame (arbitrary HPACK), any other frame, or unframed bytes.
//!
//! Properties, checked against an independent reading of the input:
//! - no header block the adapter forwards carries an `:authority` that h2
//!   (the `http` crate) rejects, and every other header is unchanged;
//! - every byte that is not part of a header block passes through unchanged,
//!   in order; without the preface the output is the input;
//! - the adapter fails only where the input itself is broken (an HPACK block
//!   that does not decode, a header block interrupted, malformed HEADERS) or
//!   where h2 behind it would close the connection (a frame over the maximum
//!   size, a CONTINUATION flood, an HPACK bomb); a block over h2's header list
//!   size is forwarded up to the field that crosses it, so h2 still refuses it;
//! - cost: the adapter's header work and its output are bounded per input byte
//!   and per block (deterministic counters, see `check_cost`), so super-linear
//!   work is a property failure, not a slow unit.

use crate::input::Input;
use loona_hpack::{Decoder, Encoder};
use vfio_gpu_h2_authority::{
    FLAG_END_HEADERS, FLAG_END_STREAM, FLAG_PADDED, FLAG_PRIORITY, FRAME_HEADER_LEN,
    HEADER_LIST_ABUSE_SIZE, HEADER_TABLE_SIZE, HeaderRewriter, MAX_CONTINUATIONS,
    MAX_FRAME_PAYLOAD, MAX_HEADER_LIST_SIZE, PREFACE, REPLACEMENT_AUTHORITY, TYPE_CONTINUATION,
    TYPE_HEADERS, authority_is_acceptable, put_frame_header,
};

const NAMES: &[&[u8]] = &[
    b":authority",
    b":method",
    b":path",
    b":scheme",
    b"content-type",
    b"te",
    b"user-agent",
    b"grpc-timeout",
];

const AUTHORITIES: &[&[u8]] = &[
    b"%2Fvar%2Flib%2Fkubelet%2Fplugins_registry%2Fx-reg.sock",
    b"localhost",
    b"/var/lib/kubelet/plugins/x/dra.sock",
    b"tmp%2Fdra.sock",
    b"localhost:50051",
    b"[::1]:1",
    b"",
];

fn frame(out: &mut Vec<u8>, ty: u8, flags: u8, sid: u32, payload: &[u8]) {
    put_frame_header(out, payload.len(), ty, flags, sid);
    out.extend_from_slice(payload);
}

/// A header block from the client's stateful encoder, framed per `flags`.
fn structured_headers(inp: &mut Input<'_>, enc: &mut Encoder<'_>, out: &mut Vec<u8>) {
    let flags = inp.byte().unwrap_or(0);
    let sid = u32::from(inp.byte().unwrap_or(1));
    let count = inp.byte().unwrap_or(0) % 8;
    let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for _ in 0..count {
        let pick = inp.byte().unwrap_or(0);
        let name = match NAMES.get(usize::from(pick % 16)) {
            Some(n) => n.to_vec(),
            None => inp.bytes(32).to_ascii_lowercase(),
        };
        let value = if pick & 0x80 != 0 {
            AUTHORITIES[usize::from(pick >> 4 & 7) % AUTHORITIES.len()].to_vec()
        } else {
            inp.bytes(64).to_vec()
        };
        headers.push((name, value));
    }
    let block = enc.encode(headers.iter().map(|(n, v)| (&n[..], &v[..])));
    let split = usize::from(inp.byte().unwrap_or(255)).min(block.len());
    let (first, rest) = block.split_at(split);
    let mut payload = Vec::new();
    let mut hflags = flags & (FLAG_END_STREAM | FLAG_PADDED | FLAG_PRIORITY);
    let pad = usize::from(flags >> 6);
    if hflags & FLAG_PADDED != 0 {
        payload.push(pad as u8);
    }
    if hflags & FLAG_PRIORITY != 0 {
        payload.extend_from_slice(&[0, 0, 0, 0, 16]);
    }
    payload.extend_from_slice(first);
    payload.resize(
        payload.len() + if hflags & FLAG_PADDED != 0 { pad } else { 0 },
        0,
    );
    if rest.is_empty() {
        hflags |= FLAG_END_HEADERS;
    }
    frame(out, TYPE_HEADERS, hflags, sid, &payload);
    if !rest.is_empty() {
        for (i, c) in rest.chunks(MAX_FRAME_PAYLOAD).enumerate() {
            let last = (i + 1) * MAX_FRAME_PAYLOAD >= rest.len();
            let f = if last { FLAG_END_HEADERS } else { 0 };
            frame(out, TYPE_CONTINUATION, f, sid, c);
        }
    }
}

/// The client byte stream the input describes, and the read sizes.
fn client_stream(data: &[u8]) -> (Vec<u8>, usize) {
    let mut inp = Input(data);
    let mode = inp.byte().unwrap_or(0);
    let mut out = Vec::new();
    if mode & 0x80 == 0 {
        out.extend_from_slice(PREFACE);
    }
    let mut enc = Encoder::new();
    while let Some(kind) = inp.byte() {
        match kind % 6 {
            0 | 1 => structured_headers(&mut inp, &mut enc, &mut out),
            2 => {
                let (flags, sid) = (inp.byte().unwrap_or(0), inp.byte().unwrap_or(1));
                frame(
                    &mut out,
                    TYPE_HEADERS,
                    flags,
                    u32::from(sid),
                    inp.bytes(255),
                );
            }
            3 => {
                let (flags, sid) = (inp.byte().unwrap_or(0), inp.byte().unwrap_or(1));
                frame(
                    &mut out,
                    TYPE_CONTINUATION,
                    flags,
                    u32::from(sid),
                    inp.bytes(255),
                );
            }
            4 => {
                let (ty, flags, sid) = (
                    inp.byte().unwrap_or(0),
                    inp.byte().unwrap_or(0),
                    inp.byte().unwrap_or(0),
                );
                frame(&mut out, ty, flags, u32::from(sid), inp.bytes(255));
            }
            _ => out.extend_from_slice(inp.bytes(32)),
        }
    }
    // Read sizes 1..=64, or the whole stream at once.
    let chunk = match usize::from(mode & 0x7f) {
        0 => usize::MAX,
        n => n.min(64),
    };
    (out, chunk)
}

/// What the server must receive: raw frames, or decoded header blocks.
#[derive(Debug, PartialEq)]
enum Event {
    Frame(Vec<u8>),
    Block {
        stream_id: u32,
        end_stream: bool,
        headers: Vec<(Vec<u8>, Vec<u8>)>,
    },
}

/// The complete frames of a stream, and whether a frame header announces more than the
/// server's maximum frame size (h2 then closes the connection).
fn frames(mut b: &[u8]) -> (Vec<&[u8]>, bool) {
    let mut v = Vec::new();
    while b.len() >= FRAME_HEADER_LEN {
        let len = usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]);
        if len > MAX_FRAME_PAYLOAD {
            return (v, true);
        }
        if b.len() < FRAME_HEADER_LEN + len {
            break;
        }
        let (f, rest) = b.split_at(FRAME_HEADER_LEN + len);
        v.push(f);
        b = rest;
    }
    (v, false)
}

/// The reference reading of a client stream (after the preface): events in
/// order, and whether it breaks somewhere (the adapter must then fail).
///
/// It reads as h2 does with the limits the plugin's servers set: a frame over the
/// maximum size, more than [`MAX_CONTINUATIONS`] CONTINUATIONs without END_HEADERS, a
/// table size update beyond [`HEADER_TABLE_SIZE`] or a block decoding to more than
/// [`HEADER_LIST_ABUSE_SIZE`] break the stream; a block over [`MAX_HEADER_LIST_SIZE`]
/// is expected up to the field that crosses it (h2 then refuses the stream).
fn reference(stream: &[u8], fix: bool) -> (Vec<Event>, bool) {
    let mut dec = Decoder::new();
    dec.set_max_allowed_table_size(HEADER_TABLE_SIZE);
    let mut events = Vec::new();
    let mut open: Option<(u32, bool, Vec<u8>)> = None;
    let mut continuations = 0;
    let (frames, oversized) = frames(stream);
    for f in frames {
        let (ty, flags) = (f[3], f[4]);
        let sid = u32::from_be_bytes([f[5], f[6], f[7], f[8]]) & 0x7fff_ffff;
        let payload = &f[FRAME_HEADER_LEN..];
        if let Some((osid, _, frag)) = open.as_mut() {
            if ty != TYPE_CONTINUATION || sid != *osid {
                return (events, true);
            }
            if flags & FLAG_END_HEADERS == 0 {
                continuations += 1;
                if continuations > MAX_CONTINUATIONS {
                    return (events, true);
                }
            }
            frag.extend_from_slice(payload);
        } else if ty == TYPE_HEADERS {
            let mut p = payload;
            let mut pad = 0;
            if flags & FLAG_PADDED != 0 {
                let Some((&n, rest)) = p.split_first() else {
                    return (events, true);
                };
                pad = usize::from(n);
                p = rest;
            }
            if flags & FLAG_PRIORITY != 0 {
                let Some(rest) = p.get(5..) else {
                    return (events, true);
                };
                p = rest;
            }
            let Some(end) = p.len().checked_sub(pad) else {
                return (events, true);
            };
            open = Some((sid, flags & FLAG_END_STREAM != 0, p[..end].to_vec()));
            continuations = 0;
        } else {
            events.push(Event::Frame(f.to_vec()));
            continue;
        }
        if flags & FLAG_END_HEADERS != 0 {
            let Some((stream_id, end_stream, block)) = open.take() else {
                continue;
            };
            let Ok(mut headers) = dec.decode(&block) else {
                return (events, true);
            };
            // Fields past the one crossing the list limit are dropped unchecked, so
            // they count with the value as received.
            let mut size = 0usize;
            let mut kept = 0;
            for (n, v) in &mut headers {
                if size < MAX_HEADER_LIST_SIZE {
                    kept += 1;
                    if fix && n == b":authority" && !authority_is_acceptable(v) {
                        *v = REPLACEMENT_AUTHORITY.as_bytes().to_vec();
                    }
                }
                size += n.len() + v.len() + 32;
            }
            if size > HEADER_LIST_ABUSE_SIZE {
                return (events, true);
            }
            headers.truncate(kept);
            events.push(Event::Block {
                stream_id,
                end_stream,
                headers,
            });
        }
    }
    (events, oversized)
}

/// Header work (bytes of fields parsed as `:authority` or re-encoded) a block may
/// cost: one full header list plus the field crossing it, which is at most a table
/// entry, counted once as read and once as written. References past the list limit
/// cost nothing here (security review L1).
const WORK_PER_BLOCK: u64 = 2 * (MAX_HEADER_LIST_SIZE + HEADER_TABLE_SIZE) as u64;

/// Header work allowed per input byte, whatever the blocks: every block costs at
/// least a 9-byte frame header, so [`WORK_PER_BLOCK`] spread over it, plus the byte
/// itself read and written (a literal field).
const WORK_PER_INPUT_BYTE: u64 = WORK_PER_BLOCK / FRAME_HEADER_LEN as u64 + 2;

/// The cost bound: the adapter's deterministic work counter
/// ([`HeaderRewriter::header_work`]) and its output grow at most linearly with the
/// input, so an input that makes it do super-linear work (an HPACK bomb expanded, a
/// block re-parsed per read) fails here rather than by a timeout.
fn check_cost(rw: &HeaderRewriter, input_len: usize, output_len: usize) {
    let input = input_len as u64;
    let blocks = rw.rewritten_blocks().saturating_add(1);
    // Per block: what the block may amplify; per byte: what the whole input may.
    let per_block_bound = blocks
        .saturating_mul(WORK_PER_BLOCK)
        .saturating_add(2 * input);
    let per_byte_bound = input
        .saturating_mul(WORK_PER_INPUT_BYTE)
        .saturating_add(WORK_PER_BLOCK);
    let work = rw.header_work();
    assert!(
        work <= per_block_bound && work <= per_byte_bound,
        "{work} bytes of header work for {input} input bytes and {blocks} blocks \
         (bounds {per_block_bound} per block, {per_byte_bound} per byte)"
    );
    // What is forwarded is the input with each block re-encoded as literals: at
    // most the same amplification.
    assert!(
        output_len as u64 <= per_block_bound,
        "{output_len} bytes forwarded for {input} input bytes and {blocks} blocks"
    );
}

/// The property for one input.
pub fn check(data: &[u8]) {
    let (stream, chunk) = client_stream(data);
    let mut rw = HeaderRewriter::new();
    let mut out = Vec::new();
    let mut failed = false;
    for c in stream.chunks(chunk.max(1)) {
        if rw.feed(c, &mut out).is_err() {
            failed = true;
            break;
        }
    }
    check_cost(&rw, stream.len(), out.len());
    let Some(frames_in) = stream.strip_prefix(PREFACE.as_slice()) else {
        // Not HTTP/2 with prior knowledge: forwarded verbatim (a prefix of the
        // preface is held back until it can be told apart).
        let held = PREFACE.starts_with(&stream);
        assert!(!failed, "a non-HTTP/2 stream failed");
        assert_eq!(
            out,
            if held { &[][..] } else { &stream[..] },
            "non-HTTP/2 bytes changed"
        );
        return;
    };
    assert!(
        out.starts_with(PREFACE),
        "the preface was not forwarded first"
    );
    // What the server's HPACK decoder (one per connection, as in h2) reads.
    let (got, got_broken) = reference(&out[PREFACE.len()..], false);
    assert!(
        !got_broken,
        "the adapter forwarded a stream the server cannot read"
    );
    for e in &got {
        if let Event::Block { headers, .. } = e {
            for (n, v) in headers {
                assert!(
                    n != b":authority" || authority_is_acceptable(v),
                    "forwarded :authority {:?} that h2 rejects",
                    String::from_utf8_lossy(v)
                );
            }
        }
    }
    let (want, broken) = reference(frames_in, true);
    if failed {
        assert!(broken, "the adapter failed on a stream that is not broken");
        assert!(want.starts_with(&got), "events before the failure differ");
    } else {
        assert!(!broken, "the adapter accepted a broken stream");
        assert_eq!(
            got, want,
            "the server would see another stream than the client sent"
        );
    }
}
