//! How the targets read their input: a byte reader, and records framed by a
//! selector byte and a little-endian 16-bit length.

/// Reads the fuzzer input as arguments, front to back; an exhausted input
/// reads as zeros and empty slices.
pub(crate) struct Input<'a>(pub(crate) &'a [u8]);

impl<'a> Input<'a> {
    /// The next byte, `None` at the end.
    pub(crate) fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    /// A length byte (at most `max`), then that many bytes.
    pub(crate) fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = usize::from(self.byte().unwrap_or(0))
            .min(max)
            .min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }

    /// A length byte (taken modulo `modulo`), then that many bytes as text.
    pub(crate) fn text(&mut self, modulo: u8) -> String {
        let n = usize::from(self.byte().unwrap_or(0) % modulo).min(self.0.len());
        let (t, rest) = self.0.split_at(n);
        self.0 = rest;
        String::from_utf8_lossy(t).into_owned()
    }
}

/// The records of `data`: (selector, content), each framed as a selector
/// byte, a 2-byte little-endian length and up to that many bytes (a record
/// cut short by the end of the input keeps what is there).
pub(crate) fn records(mut data: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (&sel, r) = data.split_first()?;
        let len = match r {
            [a, b, ..] => usize::from(u16::from_le_bytes([*a, *b])),
            _ => 0,
        };
        let body = r.get(2..).unwrap_or_default();
        let (content, next) = body.split_at(len.min(body.len()));
        data = next;
        Some((sel, content))
    })
}
