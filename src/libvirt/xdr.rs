//! A small XDR (RFC 4506) encoder and decoder, just what libvirt's remote protocol needs.
//!
//! Everything is big-endian and padded to 4 bytes. Decoding is bounds-checked: a short or
//! malformed buffer, or a length beyond the protocol's maximum, is an [`XdrError`], never a
//! panic or an unbounded allocation.

/// libvirt's `REMOTE_STRING_MAX`: the longest string the protocol carries.
pub const STRING_MAX: usize = 4 * 1024 * 1024;

/// `VIR_UUID_BUFLEN`.
pub const UUID_LEN: usize = 16;

/// A decoding failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XdrError {
    #[error("message truncated: {what} needs {need} bytes, {left} left")]
    Truncated {
        what: &'static str,
        need: usize,
        left: usize,
    },
    #[error("{what} has length {len}, more than the maximum {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("invalid {what} value {value}")]
    Invalid { what: &'static str, value: i64 },
    #[error("{0} unexpected bytes after the message body")]
    Trailing(usize),
}

/// Appends XDR items to a buffer.
#[derive(Debug, Default, Clone)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    pub fn new() -> Self {
        Encoder::default()
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// `unsigned hyper`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// `hyper`.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u32(v as u32)
    }

    pub fn f64(&mut self, v: f64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_bits().to_be_bytes());
        self
    }

    /// Fixed-length opaque data (`opaque x[n]`): the bytes, padded.
    pub fn fixed_opaque(&mut self, data: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(data);
        self.pad(data.len())
    }

    /// Variable-length opaque data (`opaque x<max>`): length, bytes, padding.
    pub fn opaque(&mut self, data: &[u8]) -> &mut Self {
        self.u32(data.len() as u32);
        self.fixed_opaque(data)
    }

    /// `string<max>` (libvirt's `remote_nonnull_string`).
    pub fn string(&mut self, s: &str) -> &mut Self {
        self.opaque(s.as_bytes())
    }

    /// An optional string (`remote_string`, an XDR pointer): a presence flag, then the string.
    pub fn opt_string(&mut self, s: Option<&str>) -> &mut Self {
        match s {
            Some(s) => self.bool(true).string(s),
            None => self.bool(false),
        }
    }

    fn pad(&mut self, len: usize) -> &mut Self {
        let pad = (4 - len % 4) % 4;
        self.buf.extend_from_slice(&[0u8; 3][..pad]);
        self
    }
}

/// Reads XDR items from a buffer.
#[derive(Debug, Clone)]
pub struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Decoder { buf, pos: 0 }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Checks the whole buffer was consumed.
    pub fn finish(&self) -> Result<(), XdrError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(XdrError::Trailing(n)),
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], XdrError> {
        if n > self.remaining() {
            return Err(XdrError::Truncated {
                what,
                need: n,
                left: self.remaining(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], XdrError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    pub fn u32(&mut self) -> Result<u32, XdrError> {
        self.array::<4>("unsigned int").map(u32::from_be_bytes)
    }

    pub fn i32(&mut self) -> Result<i32, XdrError> {
        self.array::<4>("int").map(i32::from_be_bytes)
    }

    pub fn u64(&mut self) -> Result<u64, XdrError> {
        self.array::<8>("unsigned hyper").map(u64::from_be_bytes)
    }

    pub fn i64(&mut self) -> Result<i64, XdrError> {
        self.array::<8>("hyper").map(i64::from_be_bytes)
    }

    pub fn bool(&mut self) -> Result<bool, XdrError> {
        match self.u32()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(XdrError::Invalid {
                what: "bool",
                value: v as i64,
            }),
        }
    }

    pub fn f64(&mut self) -> Result<f64, XdrError> {
        self.u64().map(f64::from_bits)
    }

    /// Fixed-length opaque data of `n` bytes (and its padding).
    pub fn fixed_opaque(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], XdrError> {
        let data = self.take(n, what)?;
        self.skip_pad(n, what)?;
        Ok(data)
    }

    /// Variable-length opaque data of at most `max` bytes.
    pub fn opaque(&mut self, max: usize, what: &'static str) -> Result<&'a [u8], XdrError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(XdrError::TooLong { what, len, max });
        }
        self.fixed_opaque(len, what)
    }

    /// A string of at most [`STRING_MAX`] bytes; invalid UTF-8 is replaced, not an error
    /// (libvirt's strings are C strings in whatever encoding the guest or host used).
    pub fn string(&mut self) -> Result<String, XdrError> {
        let b = self.opaque(STRING_MAX, "string")?;
        Ok(String::from_utf8_lossy(b).into_owned())
    }

    /// An optional string (`remote_string`).
    pub fn opt_string(&mut self) -> Result<Option<String>, XdrError> {
        if self.presence("optional string")? {
            self.string().map(Some)
        } else {
            Ok(None)
        }
    }

    /// The presence flag of an XDR optional value (pointer).
    pub fn presence(&mut self, what: &'static str) -> Result<bool, XdrError> {
        match self.u32()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(XdrError::Invalid {
                what,
                value: v as i64,
            }),
        }
    }

    /// The length of a variable-length array of at most `max` elements.
    pub fn array_len(&mut self, max: usize, what: &'static str) -> Result<usize, XdrError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(XdrError::TooLong { what, len, max });
        }
        // Every element takes at least 4 bytes: a length beyond what is left is a lie, and
        // must not turn into a large allocation.
        if len > self.remaining() / 4 {
            return Err(XdrError::Truncated {
                what,
                need: len * 4,
                left: self.remaining(),
            });
        }
        Ok(len)
    }

    fn skip_pad(&mut self, len: usize, what: &'static str) -> Result<(), XdrError> {
        let pad = (4 - len % 4) % 4;
        self.take(pad, what).map(|_| ())
    }
}

/// `remote_nonnull_domain`: how the protocol names a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteDomain {
    pub name: String,
    pub uuid: [u8; UUID_LEN],
    pub id: i32,
}

impl RemoteDomain {
    pub fn encode(&self, e: &mut Encoder) {
        e.string(&self.name).fixed_opaque(&self.uuid).i32(self.id);
    }

    pub fn decode(d: &mut Decoder<'_>) -> Result<Self, XdrError> {
        let name = d.string()?;
        let mut uuid = [0u8; UUID_LEN];
        uuid.copy_from_slice(d.fixed_opaque(UUID_LEN, "uuid")?);
        let id = d.i32()?;
        Ok(RemoteDomain { name, uuid, id })
    }
}

/// A libvirt typed parameter's value (`remote_typed_param_value`, a union on the type code).
#[derive(Debug, Clone, PartialEq)]
pub enum TypedValue {
    Int(i32),
    UInt(u32),
    LLong(i64),
    ULLong(u64),
    Double(f64),
    Boolean(bool),
    String(String),
}

// virTypedParameterType.
const TYPED_PARAM_INT: i32 = 1;
const TYPED_PARAM_UINT: i32 = 2;
const TYPED_PARAM_LLONG: i32 = 3;
const TYPED_PARAM_ULLONG: i32 = 4;
const TYPED_PARAM_DOUBLE: i32 = 5;
const TYPED_PARAM_BOOLEAN: i32 = 6;
const TYPED_PARAM_STRING: i32 = 7;

impl TypedValue {
    /// The value as a number, if it is one.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            TypedValue::Int(v) => Some(v as f64),
            TypedValue::UInt(v) => Some(v as f64),
            TypedValue::LLong(v) => Some(v as f64),
            TypedValue::ULLong(v) => Some(v as f64),
            TypedValue::Double(v) => Some(v),
            TypedValue::Boolean(_) | TypedValue::String(_) => None,
        }
    }
}

/// `remote_typed_param`: a named, typed value.
#[derive(Debug, Clone, PartialEq)]
pub struct TypedParam {
    pub field: String,
    pub value: TypedValue,
}

impl TypedParam {
    pub fn new(field: &str, value: TypedValue) -> Self {
        TypedParam {
            field: field.to_string(),
            value,
        }
    }

    pub fn encode(&self, e: &mut Encoder) {
        e.string(&self.field);
        match &self.value {
            TypedValue::Int(v) => e.i32(TYPED_PARAM_INT).i32(*v),
            TypedValue::UInt(v) => e.i32(TYPED_PARAM_UINT).u32(*v),
            TypedValue::LLong(v) => e.i32(TYPED_PARAM_LLONG).i64(*v),
            TypedValue::ULLong(v) => e.i32(TYPED_PARAM_ULLONG).u64(*v),
            TypedValue::Double(v) => e.i32(TYPED_PARAM_DOUBLE).f64(*v),
            TypedValue::Boolean(v) => e.i32(TYPED_PARAM_BOOLEAN).i32(*v as i32),
            TypedValue::String(s) => e.i32(TYPED_PARAM_STRING).string(s),
        };
    }

    pub fn decode(d: &mut Decoder<'_>) -> Result<Self, XdrError> {
        let field = d.string()?;
        let value = match d.i32()? {
            TYPED_PARAM_INT => TypedValue::Int(d.i32()?),
            TYPED_PARAM_UINT => TypedValue::UInt(d.u32()?),
            TYPED_PARAM_LLONG => TypedValue::LLong(d.i64()?),
            TYPED_PARAM_ULLONG => TypedValue::ULLong(d.u64()?),
            TYPED_PARAM_DOUBLE => TypedValue::Double(d.f64()?),
            // libvirt sends a boolean as an int and accepts any non-zero as true.
            TYPED_PARAM_BOOLEAN => TypedValue::Boolean(d.i32()? != 0),
            TYPED_PARAM_STRING => TypedValue::String(d.string()?),
            t => {
                return Err(XdrError::Invalid {
                    what: "typed parameter type",
                    value: t as i64,
                })
            }
        };
        Ok(TypedParam { field, value })
    }
}

/// Encodes `remote_typed_param params<max>`.
pub fn encode_typed_params(e: &mut Encoder, params: &[TypedParam]) {
    e.u32(params.len() as u32);
    for p in params {
        p.encode(e);
    }
}

/// Decodes `remote_typed_param params<max>`.
pub fn decode_typed_params(d: &mut Decoder<'_>, max: usize) -> Result<Vec<TypedParam>, XdrError> {
    let n = d.array_len(max, "typed parameters")?;
    (0..n).map(|_| TypedParam::decode(d)).collect()
}

/// The numeric typed parameters as `(name, value)` pairs; the others are left out.
pub fn numeric_params(params: &[TypedParam]) -> Vec<(String, f64)> {
    params
        .iter()
        .filter_map(|p| p.value.as_f64().map(|v| (p.field.clone(), v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_round_trip_big_endian() {
        let mut e = Encoder::new();
        e.u32(0xdead_beef)
            .i32(-2)
            .u64(u64::MAX - 1)
            .i64(i64::MIN)
            .bool(true)
            .bool(false)
            .f64(2.5);
        let b = e.into_bytes();
        assert_eq!(&b[..4], &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(&b[4..8], &[0xff, 0xff, 0xff, 0xfe]);
        assert_eq!(b.len(), 4 + 4 + 8 + 8 + 4 + 4 + 8);
        let mut d = Decoder::new(&b);
        assert_eq!(d.u32().unwrap(), 0xdead_beef);
        assert_eq!(d.i32().unwrap(), -2);
        assert_eq!(d.u64().unwrap(), u64::MAX - 1);
        assert_eq!(d.i64().unwrap(), i64::MIN);
        assert!(d.bool().unwrap());
        assert!(!d.bool().unwrap());
        assert_eq!(d.f64().unwrap(), 2.5);
        d.finish().unwrap();
    }

    #[test]
    fn strings_are_padded_to_four_bytes() {
        for (s, len) in [("", 4), ("a", 8), ("abcd", 8), ("abcde", 12)] {
            let mut e = Encoder::new();
            e.string(s);
            let b = e.into_bytes();
            assert_eq!(b.len(), len, "{s:?}");
            assert!(b[4 + s.len()..].iter().all(|&x| x == 0));
            let mut d = Decoder::new(&b);
            assert_eq!(d.string().unwrap(), s);
            d.finish().unwrap();
        }
    }

    #[test]
    fn optional_strings_and_opaque_round_trip() {
        let mut e = Encoder::new();
        e.opt_string(Some("qemu:///system"))
            .opt_string(None)
            .opaque(&[1, 2, 3])
            .fixed_opaque(&[9; UUID_LEN]);
        let b = e.into_bytes();
        let mut d = Decoder::new(&b);
        assert_eq!(d.opt_string().unwrap().as_deref(), Some("qemu:///system"));
        assert_eq!(d.opt_string().unwrap(), None);
        assert_eq!(d.opaque(16, "cookie").unwrap(), &[1, 2, 3]);
        assert_eq!(d.fixed_opaque(UUID_LEN, "uuid").unwrap(), &[9; UUID_LEN]);
        d.finish().unwrap();
    }

    #[test]
    fn domain_round_trips() {
        let dom = RemoteDomain {
            name: "default_vm".into(),
            uuid: [7; UUID_LEN],
            id: 3,
        };
        let mut e = Encoder::new();
        dom.encode(&mut e);
        let b = e.into_bytes();
        assert_eq!(b.len(), 4 + 12 + 16 + 4);
        let mut d = Decoder::new(&b);
        assert_eq!(RemoteDomain::decode(&mut d).unwrap(), dom);
        d.finish().unwrap();
    }

    #[test]
    fn typed_params_round_trip() {
        let params = vec![
            TypedParam::new("a", TypedValue::Int(-1)),
            TypedParam::new("b", TypedValue::UInt(2)),
            TypedParam::new("c", TypedValue::LLong(-3)),
            TypedParam::new("bandwidth", TypedValue::ULLong(1 << 40)),
            TypedParam::new("e", TypedValue::Double(0.5)),
            TypedParam::new("f", TypedValue::Boolean(true)),
            TypedParam::new("migrate_uri", TypedValue::String("unix:///x".into())),
        ];
        let mut e = Encoder::new();
        encode_typed_params(&mut e, &params);
        let b = e.into_bytes();
        // The ULLONG parameter: name "bandwidth" (4 + 12), type 4, then 8 bytes.
        let mut d = Decoder::new(&b);
        assert_eq!(decode_typed_params(&mut d, 64).unwrap(), params);
        d.finish().unwrap();
        assert_eq!(
            numeric_params(&params),
            vec![
                ("a".to_string(), -1.0),
                ("b".to_string(), 2.0),
                ("c".to_string(), -3.0),
                ("bandwidth".to_string(), (1u64 << 40) as f64),
                ("e".to_string(), 0.5),
            ]
        );
    }

    #[test]
    fn truncated_input_is_an_error_at_every_cut() {
        let mut e = Encoder::new();
        encode_typed_params(
            &mut e,
            &[
                TypedParam::new("downtime", TypedValue::ULLong(12)),
                TypedParam::new("s", TypedValue::String("text".into())),
            ],
        );
        let b = e.into_bytes();
        for cut in 0..b.len() {
            let mut d = Decoder::new(&b[..cut]);
            assert!(decode_typed_params(&mut d, 64).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn lengths_beyond_limits_are_refused() {
        // A string claiming 4 GiB.
        let b = [0xff, 0xff, 0xff, 0xff, b'a', 0, 0, 0];
        assert!(matches!(
            Decoder::new(&b).string(),
            Err(XdrError::TooLong { .. })
        ));
        // An array longer than its maximum.
        let mut e = Encoder::new();
        e.u32(65);
        assert!(matches!(
            decode_typed_params(&mut Decoder::new(&e.into_bytes()), 64),
            Err(XdrError::TooLong { .. })
        ));
        // An array whose count exceeds what the buffer could hold.
        let mut e = Encoder::new();
        e.u32(10).u32(0);
        assert!(matches!(
            Decoder::new(&e.into_bytes()).array_len(100, "x"),
            Err(XdrError::Truncated { .. })
        ));
        // A bad union discriminant and a bad presence flag.
        let mut e = Encoder::new();
        e.string("f").i32(99).i32(0);
        assert!(TypedParam::decode(&mut Decoder::new(&e.into_bytes())).is_err());
        let mut e = Encoder::new();
        e.u32(2);
        assert!(Decoder::new(&e.into_bytes()).opt_string().is_err());
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        let mut e = Encoder::new();
        e.opaque(&[0x66, 0xff, 0x6f]);
        let s = Decoder::new(&e.into_bytes()).string().unwrap();
        assert_eq!(s, "f\u{fffd}o");
    }
}
