//! PostgreSQL's binary COPY format (`COPY ... FROM STDIN (FORMAT binary)`), written row by row.
//!
//! Each value goes as PostgreSQL's own binary representation (big-endian integers and IEEE
//! floats, microseconds since 2000-01-01 for timestamps), so the server parses no text: in
//! the end-to-end benchmark the text format's float, timestamp and integer parsing was a fifth
//! of PostgreSQL's COPY time. Strings need no escaping; PostgreSQL still checks their encoding
//! (a NUL is refused as in text).
//!
//! A value its column cannot hold (a `u64` over `i64::MAX` for a `bigint`) is sent 16 bytes
//! wide: PostgreSQL refuses that row with "incorrect binary data format" (22P03, a data error),
//! as the text format refuses an out-of-range literal, and the sink names the row.

/// PostgreSQL's timestamp epoch, 2000-01-01 00:00 UTC, in Unix milliseconds.
const PG_EPOCH_UNIX_MS: i64 = 946_684_800_000;
/// The element types of the arrays written here (`pg_type.oid`).
const INT8_OID: i32 = 20;
const FLOAT8_OID: i32 = 701;

/// A COPY data stream in binary format: the header, then rows, then [`BinaryCopy::finish`].
#[derive(Debug)]
pub struct BinaryCopy {
    buf: Vec<u8>,
    rows: usize,
}

impl Default for BinaryCopy {
    fn default() -> Self {
        Self::new()
    }
}

impl BinaryCopy {
    /// The stream's header: signature, flags (no OIDs), no header extension.
    pub fn new() -> Self {
        let mut buf = Vec::with_capacity(4096);
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&0i32.to_be_bytes());
        buf.extend_from_slice(&0i32.to_be_bytes());
        Self { buf, rows: 0 }
    }

    /// Rows begun so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Begins a row of `fields` values; exactly that many value calls follow.
    pub fn row(&mut self, fields: i16) {
        self.rows += 1;
        self.buf.extend_from_slice(&fields.to_be_bytes());
    }

    /// The stream with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }

    fn length(&mut self, len: usize) {
        // A field over 2 GiB cannot come from a Kafka message; the saturated length breaks the
        // stream's framing, which PostgreSQL refuses as a data error, never as another row.
        let len = i32::try_from(len).unwrap_or(i32::MAX);
        self.buf.extend_from_slice(&len.to_be_bytes());
    }

    fn field(&mut self, bytes: &[u8]) {
        self.length(bytes.len());
        self.buf.extend_from_slice(bytes);
    }

    /// SQL NULL.
    pub fn null(&mut self) {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
    }

    /// A `text` value.
    pub fn text(&mut self, s: &str) {
        self.field(s.as_bytes());
    }

    /// A `text` value or NULL.
    pub fn opt_text(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.text(s),
            None => self.null(),
        }
    }

    /// An `integer` value.
    pub fn int4(&mut self, v: impl Into<i128>) {
        let v = v.into();
        match i32::try_from(v) {
            Ok(v) => self.field(&v.to_be_bytes()),
            Err(_) => self.field(&v.to_be_bytes()),
        }
    }

    /// A `bigint` value.
    pub fn int8(&mut self, v: impl Into<i128>) {
        let v = v.into();
        match i64::try_from(v) {
            Ok(v) => self.field(&v.to_be_bytes()),
            Err(_) => self.field(&v.to_be_bytes()),
        }
    }

    /// A `double precision` value, bit for bit (NaN and the infinities included).
    pub fn float8(&mut self, x: f64) {
        self.field(&x.to_be_bytes());
    }

    /// A `double precision` value or NULL.
    pub fn opt_float8(&mut self, x: Option<f64>) {
        match x {
            Some(x) => self.float8(x),
            None => self.null(),
        }
    }

    /// A `boolean` value.
    pub fn bool(&mut self, b: bool) {
        self.field(&[u8::from(b)]);
    }

    /// A `timestamptz` from epoch milliseconds. Beyond what microseconds since 2000 can hold:
    /// PostgreSQL's `-infinity` / `infinity`; within that but outside PostgreSQL's range
    /// (4713 BC to 294276 AD) PostgreSQL refuses the row (22008, a data error).
    pub fn timestamptz(&mut self, unix_ms: i64) {
        let micros = unix_ms
            .checked_sub(PG_EPOCH_UNIX_MS)
            .and_then(|ms| ms.checked_mul(1000))
            .unwrap_or(if unix_ms < 0 { i64::MIN } else { i64::MAX });
        self.field(&micros.to_be_bytes());
    }

    /// A one-dimensional `double precision[]`.
    pub fn float8_array(&mut self, items: &[f64]) {
        self.array(FLOAT8_OID, items.len(), |copy| {
            for x in items {
                copy.float8(*x);
            }
        });
    }

    /// A one-dimensional `bigint[]`.
    pub fn int8_array(&mut self, items: &[u64]) {
        self.array(INT8_OID, items.len(), |copy| {
            for x in items {
                copy.int8(*x);
            }
        });
    }

    /// An array value: its length prefix, then PostgreSQL's array header (dimensions, no
    /// NULLs, the element type, length and lower bound 1), then the elements `elements` writes.
    fn array(&mut self, element_oid: i32, len: usize, elements: impl FnOnce(&mut Self)) {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0i32.to_be_bytes());
        let start = self.buf.len();
        let dims: i32 = if len == 0 { 0 } else { 1 };
        for word in [dims, 0, element_oid] {
            self.buf.extend_from_slice(&word.to_be_bytes());
        }
        if len > 0 {
            let len = i32::try_from(len).unwrap_or(i32::MAX);
            self.buf.extend_from_slice(&len.to_be_bytes());
            self.buf.extend_from_slice(&1i32.to_be_bytes());
        }
        elements(self);
        let written = i32::try_from(self.buf.len() - start).unwrap_or(i32::MAX);
        self.buf[at..start].copy_from_slice(&written.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(build: impl FnOnce(&mut BinaryCopy)) -> Vec<u8> {
        let mut copy = BinaryCopy::new();
        build(&mut copy);
        let bytes = copy.finish();
        assert_eq!(&bytes[..11], b"PGCOPY\n\xff\r\n\0");
        assert_eq!(&bytes[bytes.len() - 2..], &[0xff, 0xff], "trailer");
        bytes[19..bytes.len() - 2].to_vec()
    }

    #[test]
    fn scalars_are_length_prefixed_big_endian() {
        let bytes = body(|c| {
            c.row(4);
            c.int4(7i32);
            c.int8(-2i64);
            c.bool(true);
            c.null();
        });
        let mut want = vec![0, 4];
        want.extend([0, 0, 0, 4, 0, 0, 0, 7]);
        want.extend([0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]);
        want.extend([0, 0, 0, 1, 1]);
        want.extend([0xff, 0xff, 0xff, 0xff]);
        assert_eq!(bytes, want);
    }

    #[test]
    fn values_too_wide_for_their_column_go_sixteen_bytes_wide() {
        let bytes = body(|c| c.int8(u64::MAX));
        assert_eq!(&bytes[..4], &[0, 0, 0, 16]);
        let bytes = body(|c| c.int4(u32::MAX));
        assert_eq!(&bytes[..4], &[0, 0, 0, 16]);
        let bytes = body(|c| c.int4(i32::MIN));
        assert_eq!(&bytes[..4], &[0, 0, 0, 4]);
    }

    #[test]
    fn timestamps_count_microseconds_from_2000() {
        let micros = |ms: i64| {
            let bytes = body(|c| c.timestamptz(ms));
            assert_eq!(&bytes[..4], &[0, 0, 0, 8]);
            i64::from_be_bytes(bytes[4..12].try_into().unwrap())
        };
        assert_eq!(micros(946_684_800_000), 0);
        assert_eq!(micros(0), -946_684_800_000_000);
        assert_eq!(micros(946_684_800_123), 123_000);
        assert_eq!(micros(i64::MAX), i64::MAX, "infinity");
        assert_eq!(micros(i64::MIN), i64::MIN, "-infinity");
        assert_eq!(micros(-9_300_000_000_000_000), i64::MIN);
    }

    #[test]
    fn arrays_carry_their_header_and_elements() {
        let bytes = body(|c| c.float8_array(&[1.5, -0.0]));
        let mut want = Vec::new();
        want.extend(44i32.to_be_bytes());
        for w in [1i32, 0, 701, 2, 1] {
            want.extend(w.to_be_bytes());
        }
        for x in [1.5f64, -0.0] {
            want.extend(8i32.to_be_bytes());
            want.extend(x.to_be_bytes());
        }
        assert_eq!(bytes, want);
        let bytes = body(|c| c.int8_array(&[]));
        let mut want = Vec::new();
        want.extend(12i32.to_be_bytes());
        for w in [0i32, 0, 20] {
            want.extend(w.to_be_bytes());
        }
        assert_eq!(bytes, want);
    }

    #[test]
    fn strings_go_unescaped() {
        let bytes = body(|c| c.text("a\tb\\\n"));
        assert_eq!(bytes, [&[0, 0, 0, 5][..], b"a\tb\\\n"].concat());
    }
}
