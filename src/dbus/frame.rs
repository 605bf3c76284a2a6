//! What comes in on the bus socket, message by message, before zbus reads it: the header fields
//! walked, so that no peer can end our connection with a message zbus cannot read.
//!
//! zbus knows header field codes 1 to 9 and fails on any other; a failure ends its reader and
//! with it the connection. The specification asks for unknown fields to be ignored, and
//! dbus-broker passes a peer's on. So a message with one is, when a peer sent it, dropped with
//! its file descriptors (nothing of ours would read it), and when the bus sent it, kept without
//! its unknown fields. Every other message goes to zbus untouched.
//!
//! Nothing here panics, whatever the bytes: a header that cannot be walked is
//! [`Malformed`], and the connection ends on it, as it would in zbus.

/// The size of the fixed part of a header.
pub(super) const FIXED: usize = 16;

/// The largest message the protocol allows (zbus refuses larger ones too).
const MAX_MESSAGE: usize = 128 * 1024 * 1024;

/// How deep containers (arrays, structures, dict entries, variants) may nest in a field's value:
/// the specification's 32 arrays and 32 structures, and no more.
const MAX_DEPTH: u32 = 64;

/// The bus's own name: only its messages are kept without their unknown fields.
const BUS_NAME: &[u8] = b"org.freedesktop.DBus";

const SENDER: u8 = 7;
const UNIX_FDS: u8 = 9;

/// A header that cannot be walked, or a message larger than the protocol allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Malformed(pub(super) &'static str);

impl From<Malformed> for std::io::Error {
    fn from(m: Malformed) -> Self {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("malformed message from the bus: {}", m.0),
        )
    }
}

/// The lengths of the message whose fixed header is `fixed`: its whole header (the fields padded
/// to 8 bytes) and its body.
pub(super) fn lengths(fixed: &[u8; FIXED]) -> Result<(usize, usize), Malformed> {
    let order = Order::of(fixed[0])?;
    let body = order.u32([fixed[4], fixed[5], fixed[6], fixed[7]]) as usize;
    let fields = order.u32([fixed[12], fixed[13], fixed[14], fixed[15]]) as usize;
    let header = (FIXED + fields).next_multiple_of(8);
    if header.saturating_add(body) > MAX_MESSAGE {
        return Err(Malformed("larger than a message may be"));
    }
    Ok((header, body))
}

/// What to do with a message, from its header.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// zbus reads it as it is (or fails on it as it would anyway).
    Pass { fds: usize },
    /// A peer's, with a field zbus cannot read: dropped, and its `fds` descriptors with it.
    Drop { fds: usize },
    /// The bus's own, with a field zbus cannot read: its header becomes `header` (without the
    /// unknown fields; the body follows unchanged).
    Strip { header: Vec<u8>, fds: usize },
}

/// Judges the message whose whole header (fixed part, fields, padding: the first length of
/// [`lengths`]) is `header`.
pub(super) fn judge(header: &[u8]) -> Result<Verdict, Malformed> {
    let fixed: &[u8; FIXED] = header
        .get(..FIXED)
        .and_then(|f| f.try_into().ok())
        .ok_or(Malformed("truncated header"))?;
    let order = Order::of(fixed[0])?;
    let (header_len, _) = lengths(fixed)?;
    if header.len() != header_len {
        return Err(Malformed("truncated header"));
    }
    let end = FIXED + order.u32([fixed[12], fixed[13], fixed[14], fixed[15]]) as usize;
    // One walk, nothing allocated, for the common case: no unknown field.
    let (mut unknown, mut fds, mut from_the_bus) = (false, 0, false);
    for field in Fields::new(header, end, order) {
        let field = field?;
        match field.code {
            1..=9 => {}
            _ => unknown = true,
        }
        match (field.code, field.value) {
            (UNIX_FDS, Value::U32(n)) => fds = n as usize,
            (SENDER, Value::Str(at, len)) => {
                from_the_bus = header.get(at..at.saturating_add(len)) == Some(BUS_NAME);
            }
            _ => {}
        }
    }
    if !unknown {
        return Ok(Verdict::Pass { fds });
    }
    if !from_the_bus {
        return Ok(Verdict::Drop { fds });
    }
    let mut stripped = header[..FIXED].to_vec();
    for field in Fields::new(header, end, order) {
        let field = field?;
        if (1..=9).contains(&field.code) {
            stripped.resize(stripped.len().next_multiple_of(8), 0);
            stripped.extend_from_slice(&header[field.start..field.end]);
        }
    }
    let fields_len = u32::try_from(stripped.len() - FIXED).map_err(|_| Malformed("too long"))?;
    stripped[12..16].copy_from_slice(&order.bytes(fields_len));
    stripped.resize(stripped.len().next_multiple_of(8), 0);
    Ok(Verdict::Strip {
        header: stripped,
        fds,
    })
}

/// A header field: its code, where it lies in the header, and its value when that is a `u32`
/// or a string (where its bytes lie, and how many).
#[derive(Clone, Copy)]
struct Field {
    code: u8,
    start: usize,
    end: usize,
    value: Value,
}

#[derive(Clone, Copy)]
enum Value {
    U32(u32),
    Str(usize, usize),
    Other,
}

/// The fields of `header`, which end at `end`, one after the other; after an error, no more.
struct Fields<'a> {
    header: &'a [u8],
    end: usize,
    order: Order,
    at: usize,
}

impl<'a> Fields<'a> {
    fn new(header: &'a [u8], end: usize, order: Order) -> Self {
        Fields {
            header,
            end,
            order,
            at: FIXED,
        }
    }
}

impl Iterator for Fields<'_> {
    type Item = Result<Field, Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.end {
            return None;
        }
        let field = walk_field(
            self.header,
            self.at.next_multiple_of(8),
            self.end,
            self.order,
        );
        match &field {
            Ok(f) => self.at = f.end,
            Err(_) => self.at = self.end,
        }
        Some(field)
    }
}

/// Walks the field that starts at `at` (on an 8-byte boundary), the fields ending at `end`.
fn walk_field(header: &[u8], at: usize, end: usize, order: Order) -> Result<Field, Malformed> {
    let bytes = header.get(..end).ok_or(Malformed("truncated header"))?;
    let mut r = Cursor { bytes, at, order };
    let code = r.byte()?;
    let signature = r.signature()?;
    let mut sig = Sig {
        bytes: signature,
        at: 0,
    };
    let value_at = r.at;
    r.value(&mut sig, 0)?;
    if sig.at != signature.len() {
        return Err(Malformed("a field's variant holds more than one type"));
    }
    let value = match signature {
        b"u" => Value::U32(Cursor { at: value_at, ..r }.u32()?),
        b"s" | b"o" => {
            let mut v = Cursor { at: value_at, ..r };
            let len = v.u32()? as usize;
            Value::Str(v.at, len)
        }
        _ => Value::Other,
    };
    Ok(Field {
        code,
        start: at,
        end: r.at,
        value,
    })
}

/// A byte order, from a message's first byte.
#[derive(Debug, Clone, Copy)]
enum Order {
    Little,
    Big,
}

impl Order {
    fn of(byte: u8) -> Result<Order, Malformed> {
        match byte {
            b'l' => Ok(Order::Little),
            b'B' => Ok(Order::Big),
            _ => Err(Malformed("unknown byte order")),
        }
    }

    fn u32(self, b: [u8; 4]) -> u32 {
        match self {
            Order::Little => u32::from_le_bytes(b),
            Order::Big => u32::from_be_bytes(b),
        }
    }

    fn bytes(self, n: u32) -> [u8; 4] {
        match self {
            Order::Little => n.to_le_bytes(),
            Order::Big => n.to_be_bytes(),
        }
    }
}

/// A position in a type signature.
struct Sig<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Sig<'_> {
    fn next(&mut self) -> Result<u8, Malformed> {
        let c = *self
            .bytes
            .get(self.at)
            .ok_or(Malformed("incomplete signature"))?;
        self.at += 1;
        Ok(c)
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }
}

/// A position in the header's bytes, which end where the fields end.
#[derive(Clone, Copy)]
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    order: Order,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(Malformed("a value runs past the header fields"))?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn align(&mut self, n: usize) -> Result<(), Malformed> {
        let aligned = self.at.next_multiple_of(n);
        self.take(aligned - self.at).map(|_| ())
    }

    fn byte(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, Malformed> {
        self.align(4)?;
        let b = self.take(4)?;
        Ok(self.order.u32([b[0], b[1], b[2], b[3]]))
    }

    /// A signature (a length byte, the bytes, a 0).
    fn signature(&mut self) -> Result<&'a [u8], Malformed> {
        let len = self.byte()? as usize;
        self.nul_terminated(len)
    }

    fn nul_terminated(&mut self, len: usize) -> Result<&'a [u8], Malformed> {
        let bytes = self.take(len)?;
        match self.byte()? {
            0 => Ok(bytes),
            _ => Err(Malformed("a string without its 0")),
        }
    }

    /// Skips one value of the single complete type at `sig`, `depth` containers deep.
    fn value(&mut self, sig: &mut Sig<'_>, depth: u32) -> Result<(), Malformed> {
        match sig.next()? {
            b'y' => self.take(1).map(drop),
            b'n' | b'q' => self.align(2).and_then(|()| self.take(2).map(drop)),
            b'b' | b'i' | b'u' | b'h' => self.u32().map(drop),
            b'x' | b't' | b'd' => self.align(8).and_then(|()| self.take(8).map(drop)),
            b's' | b'o' => {
                let len = self.u32()? as usize;
                self.nul_terminated(len).map(drop)
            }
            b'g' => self.signature().map(drop),
            b'v' => {
                let depth = deeper(depth)?;
                let inner = self.signature()?;
                let mut inner_sig = Sig {
                    bytes: inner,
                    at: 0,
                };
                self.value(&mut inner_sig, depth)?;
                if inner_sig.at != inner.len() {
                    return Err(Malformed("a variant holds more than one type"));
                }
                Ok(())
            }
            b'a' => {
                let depth = deeper(depth)?;
                let len = self.u32()? as usize;
                let element = sig.at;
                // The padding before the first element is there even when there is none.
                self.align(alignment(sig.peek())?)?;
                let end = self
                    .at
                    .checked_add(len)
                    .filter(|&e| e <= self.bytes.len())
                    .ok_or(Malformed("an array runs past the header fields"))?;
                // Walked once for its signature, whether or not there are elements.
                skip_type(sig, depth)?;
                while self.at < end {
                    let mut each = Sig {
                        bytes: sig.bytes,
                        at: element,
                    };
                    // Every element takes at least one byte: this ends.
                    self.value(&mut each, depth)?;
                }
                if self.at != end {
                    return Err(Malformed("an array's elements run past its length"));
                }
                Ok(())
            }
            open @ (b'(' | b'{') => {
                let depth = deeper(depth)?;
                let close = if open == b'(' { b')' } else { b'}' };
                self.align(8)?;
                let mut members = 0;
                while sig.peek() != Some(close) {
                    self.value(sig, depth)?;
                    members += 1;
                }
                sig.next()?;
                if members == 0 || (open == b'{' && members != 2) {
                    return Err(Malformed("an empty structure or a bad dict entry"));
                }
                Ok(())
            }
            _ => Err(Malformed("an unknown type in a signature")),
        }
    }
}

fn deeper(depth: u32) -> Result<u32, Malformed> {
    if depth >= MAX_DEPTH {
        return Err(Malformed("values nested too deep"));
    }
    Ok(depth + 1)
}

/// The alignment of the type that starts with `c`.
fn alignment(c: Option<u8>) -> Result<usize, Malformed> {
    match c.ok_or(Malformed("incomplete signature"))? {
        b'y' | b'g' | b'v' => Ok(1),
        b'n' | b'q' => Ok(2),
        b'b' | b'i' | b'u' | b'h' | b's' | b'o' | b'a' => Ok(4),
        b'x' | b't' | b'd' | b'(' | b'{' => Ok(8),
        _ => Err(Malformed("an unknown type in a signature")),
    }
}

/// Moves `sig` past one single complete type, without a value (an array's element type).
fn skip_type(sig: &mut Sig<'_>, depth: u32) -> Result<(), Malformed> {
    match sig.next()? {
        b'y' | b'n' | b'q' | b'b' | b'i' | b'u' | b'h' | b'x' | b't' | b'd' | b's' | b'o'
        | b'g' | b'v' => Ok(()),
        b'a' => skip_type(sig, deeper(depth)?),
        open @ (b'(' | b'{') => {
            let depth = deeper(depth)?;
            let close = if open == b'(' { b')' } else { b'}' };
            let mut members = 0;
            while sig.peek() != Some(close) {
                skip_type(sig, depth)?;
                members += 1;
            }
            sig.next()?;
            if members == 0 || (open == b'{' && members != 2) {
                return Err(Malformed("an empty structure or a bad dict entry"));
            }
            Ok(())
        }
        _ => Err(Malformed("an unknown type in a signature")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little-endian header with `fields` (`(code, signature, value bytes as marshalled at
    /// the value's offset, which the caller aligns)`), padded.
    fn header(fields: &[(u8, &str, &[u8])]) -> Vec<u8> {
        let mut h = vec![b'l', 4, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        for (code, sig, value) in fields {
            h.resize(h.len().next_multiple_of(8), 0);
            h.push(*code);
            h.push(sig.len() as u8);
            h.extend(sig.as_bytes());
            h.push(0);
            let align = alignment(sig.bytes().next()).unwrap_or(1);
            h.resize(h.len().next_multiple_of(align), 0);
            h.extend(*value);
        }
        let len = (h.len() - FIXED) as u32;
        h[12..16].copy_from_slice(&len.to_le_bytes());
        h.resize(h.len().next_multiple_of(8), 0);
        h
    }

    fn string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u32).to_le_bytes().to_vec();
        v.extend(s.as_bytes());
        v.push(0);
        v
    }

    fn path() -> (u8, &'static str, Vec<u8>) {
        (1, "o", string("/x"))
    }

    fn refs(fields: &[(u8, &'static str, Vec<u8>)]) -> Vec<u8> {
        let f: Vec<(u8, &str, &[u8])> = fields.iter().map(|(c, s, v)| (*c, *s, &v[..])).collect();
        header(&f)
    }

    #[test]
    fn zbus_s_own_messages_pass_untouched() {
        let m = zbus::Message::signal("/a/b", "org.example.I", "M")
            .destination(":1.5")
            .build(&("text", 7u32))
            .expect("message");
        let data = m.data();
        let fixed: &[u8; FIXED] = data[..FIXED].try_into().expect("16 bytes");
        let (h, b) = lengths(fixed).expect("lengths");
        assert_eq!(h + b, data.len());
        assert_eq!(judge(&data[..h]), Ok(Verdict::Pass { fds: 0 }));
    }

    #[test]
    fn a_peer_s_unknown_field_drops_the_message_with_its_descriptors() {
        let h = refs(&[
            path(),
            (7, "s", string(":1.9")),
            (10, "s", string("surprise")),
            (9, "u", 3u32.to_le_bytes().to_vec()),
        ]);
        assert_eq!(judge(&h), Ok(Verdict::Drop { fds: 3 }));
        // Code 0 and codes past 9 alike; the value of any type.
        for code in [0, 10, 200, 255] {
            let h = refs(&[path(), (code, "ay", [2, 0, 0, 0, 7, 8].to_vec())]);
            assert_eq!(judge(&h), Ok(Verdict::Drop { fds: 0 }), "{code}");
        }
    }

    #[test]
    fn the_bus_s_unknown_fields_are_stripped() {
        let fields = [
            path(),
            (10, "(yv)", vec![1, 1, b'u', 0, 5, 0, 0, 0]),
            (7, "s", string("org.freedesktop.DBus")),
            (11, "a{sv}", {
                let mut v = 24u32.to_le_bytes().to_vec();
                v.extend([0, 0, 0, 0]); // to 8 (the entry)
                v.extend(string("k"));
                v.extend([1, b'x', 0, 0, 0, 0, 0, 0, 0, 0]); // signature, then to 8
                v.extend(9u64.to_le_bytes());
                v
            }),
            (9, "u", 2u32.to_le_bytes().to_vec()),
        ];
        let h = refs(&fields);
        let Ok(Verdict::Strip { header, fds }) = judge(&h) else {
            panic!("{:?}", judge(&h));
        };
        assert_eq!(fds, 2);
        let expected = refs(&[fields[0].clone(), fields[2].clone(), fields[4].clone()]);
        assert_eq!(header, expected);
        assert_eq!(judge(&header), Ok(Verdict::Pass { fds: 2 }));
        assert_eq!(header.len() % 8, 0);
    }

    #[test]
    fn big_endian_headers_are_walked_too() {
        let mut h = vec![b'B', 4, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0];
        h.extend([12, 1, b'u', 0, 0, 0, 0, 9]);
        h[12..16].copy_from_slice(&8u32.to_be_bytes());
        assert_eq!(judge(&h), Ok(Verdict::Drop { fds: 0 }));
    }

    #[test]
    fn malformed_headers_are_errors_never_panics() {
        let good = refs(&[path(), (10, "s", string("x"))]);
        // Every truncation, and every byte changed to each of a few values: no panic.
        for cut in 0..good.len() {
            let _ = judge(&good[..cut]);
        }
        for at in 0..good.len() {
            for v in [0u8, 1, 0x7f, 0xff, b'a', b'(', b'{', b'v'] {
                let mut m = good.clone();
                m[at] = v;
                if let Ok(fixed) = <&[u8; FIXED]>::try_from(&m[..FIXED])
                    && let Ok((h, _)) = lengths(fixed)
                    && h <= m.len()
                {
                    let _ = judge(&m[..h]);
                }
            }
        }
        // A string longer than the fields.
        let h = refs(&[path(), (10, "s", [0xff, 0xff, 0xff, 0x7f, 0].to_vec())]);
        assert!(judge(&h).is_err());
        // An array longer than the fields.
        let h = refs(&[path(), (10, "ay", [0xff, 0xff, 0xff, 0xff].to_vec())]);
        assert!(judge(&h).is_err());
        // A header that says it is longer than it is.
        let mut h = refs(&[path()]);
        h.truncate(h.len() - 8);
        assert_eq!(judge(&h), Err(Malformed("truncated header")));
        // An unknown type, an empty structure, an unclosed one, two types in a variant.
        for sig in ["z", "()", "(y", "yy", "a"] {
            let h = refs(&[path(), (10, sig, [0u8; 16].to_vec())]);
            assert!(judge(&h).is_err(), "{sig}");
        }
    }

    #[test]
    fn huge_lengths_are_refused_before_anything_is_read() {
        let mut fixed = [
            b'l', 4, 0, 1, 0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert!(lengths(&fixed).is_err());
        fixed[4..8].copy_from_slice(&[0; 4]);
        fixed[12..16].copy_from_slice(&[0xff; 4]);
        assert!(lengths(&fixed).is_err());
        fixed[0] = b'x';
        assert!(lengths(&fixed).is_err());
    }

    #[test]
    fn deep_nesting_is_bounded() {
        // Variants in variants: each level a signature "v" then the next.
        let mut value = Vec::new();
        for _ in 0..200 {
            value.extend([1, b'v', 0]);
        }
        value.extend([1, b'y', 0, 7]);
        let h = refs(&[path(), (10, "v", value)]);
        assert_eq!(judge(&h), Err(Malformed("values nested too deep")));
        // Arrays of arrays in the signature.
        let sig = format!("{}y", "a".repeat(100));
        let sig: &'static str = Box::leak(sig.into_boxed_str());
        let h = refs(&[path(), (10, sig, 0u32.to_le_bytes().to_vec())]);
        assert_eq!(judge(&h), Err(Malformed("values nested too deep")));
        // Not too deep: passes.
        let h = refs(&[
            path(),
            (7, "s", string(":1.1")),
            (10, "aay", 0u32.to_le_bytes().to_vec()),
        ]);
        assert_eq!(judge(&h), Ok(Verdict::Drop { fds: 0 }));
    }

    /// Many pseudo-random mutations of a few headers (a fixed seed: the same every run): no
    /// panic, and what is stripped is a header that passes, with the same descriptors, no
    /// longer than it was and padded to 8.
    #[test]
    fn mutated_headers_never_panic_and_strip_to_what_passes() {
        let seeds = [
            refs(&[
                path(),
                (7, "s", string("org.freedesktop.DBus")),
                (10, "a(yv)", {
                    let mut v = 5u32.to_le_bytes().to_vec();
                    v.extend([0, 0, 0, 0, 1, 1, b'y', 0, 9]);
                    v
                }),
                (9, "u", 1u32.to_le_bytes().to_vec()),
            ]),
            refs(&[
                path(),
                (7, "s", string(":1.4")),
                (200, "g", vec![2, b'a', b'y', 0]),
            ]),
            refs(&[
                path(),
                (3, "s", string("Member")),
                (8, "g", vec![1, b's', 0]),
            ]),
        ];
        assert!(matches!(
            judge(&seeds[0]),
            Ok(Verdict::Strip { fds: 1, .. })
        ));
        assert_eq!(judge(&seeds[1]), Ok(Verdict::Drop { fds: 0 }));
        assert_eq!(judge(&seeds[2]), Ok(Verdict::Pass { fds: 0 }));
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..30_000u32 {
            let seed = &seeds[round as usize % seeds.len()];
            let mut m = seed.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() % m.len() as u64) as usize;
                m[at] = (next() >> 8) as u8;
            }
            let Ok(fixed) = <&[u8; FIXED]>::try_from(&m[..FIXED]) else {
                continue;
            };
            let Ok((h, _)) = lengths(fixed) else { continue };
            let Some(header) = m.get(..h) else { continue };
            if let Ok(Verdict::Strip {
                header: stripped,
                fds,
            }) = judge(header)
            {
                assert_eq!(stripped.len() % 8, 0);
                assert!(stripped.len() <= header.len());
                assert_eq!(judge(&stripped), Ok(Verdict::Pass { fds }), "{m:?}");
            }
        }
    }
}
