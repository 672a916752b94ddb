//! Kubernetes resource quantities (`512Mi`, `2G`, `1.5Gi`, `500m`, `1e3`, or a bare JSON number).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A quantity as written in the spec; parsed on demand so that a bad value is reported with its
/// field path by the converter rather than failing the whole document.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Quantity(pub String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("{0:?} is not a quantity (expected e.g. 512Mi, 2Gi, 1.5G, 500m)")]
    Syntax(String),
    #[error("{0:?} is out of range")]
    Range(String),
    #[error("{0:?} is negative")]
    Negative(String),
}

impl Quantity {
    /// Value in bytes (or units), rounded up to a whole unit.
    pub fn value(&self) -> Result<u64, QuantityError> {
        let milli = parse_quantity(&self.0)?;
        let whole = milli.div_ceil(1000);
        u64::try_from(whole).map_err(|_| QuantityError::Range(self.0.clone()))
    }

    /// Value in thousandths of a unit (CPU millicores).
    pub fn milli_value(&self) -> Result<u64, QuantityError> {
        let milli = parse_quantity(&self.0)?;
        u64::try_from(milli).map_err(|_| QuantityError::Range(self.0.clone()))
    }
}

impl From<&str> for Quantity {
    fn from(s: &str) -> Self {
        Quantity(s.to_string())
    }
}

impl Serialize for Quantity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = Quantity;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a quantity (a string such as 512Mi or 2Gi, or a number)")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Quantity, E> {
                Ok(Quantity(s.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, u: u64) -> Result<Quantity, E> {
                Ok(Quantity(u.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, i: i64) -> Result<Quantity, E> {
                Ok(Quantity(i.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, f: f64) -> Result<Quantity, E> {
                Ok(Quantity(f.to_string()))
            }
        }
        d.deserialize_any(Text)
    }
}

/// Parse a quantity into thousandths of its unit (`"1Ki"` → 1_024_000, `"500m"` → 500).
/// Fractions beyond a thousandth are rounded up.
pub fn parse_quantity(text: &str) -> Result<u128, QuantityError> {
    let syntax = || QuantityError::Syntax(text.to_string());
    let range = || QuantityError::Range(text.to_string());
    let s = text.trim();
    let (s, negative) = match s.strip_prefix('-') {
        Some(rest) => (rest, true),
        None => (s.strip_prefix('+').unwrap_or(s), false),
    };
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(num_end);
    if num.is_empty() || num == "." || num.matches('.').count() > 1 {
        return Err(syntax());
    }
    let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
    // Multiplier as (numerator, denominator-exponent-of-ten) to stay in integers.
    let (mult, exp10): (u128, i32) = match suffix {
        "" => (1, 0),
        "m" => (1, -3),
        "k" => (1, 3),
        "M" => (1, 6),
        "G" => (1, 9),
        "T" => (1, 12),
        "P" => (1, 15),
        "E" => (1, 18),
        "Ki" => (1 << 10, 0),
        "Mi" => (1 << 20, 0),
        "Gi" => (1 << 30, 0),
        "Ti" => (1 << 40, 0),
        "Pi" => (1 << 50, 0),
        "Ei" => (1 << 60, 0),
        other => {
            let exp = other
                .strip_prefix(['e', 'E'])
                .and_then(|e| e.parse::<i32>().ok())
                .ok_or_else(syntax)?;
            if !(-3..=30).contains(&exp) {
                return Err(range());
            }
            (1, exp)
        }
    };
    if frac_part.len() > 30 || int_part.len() > 30 {
        return Err(range());
    }
    // mantissa = digits / 10^frac_len; value_milli = mantissa * mult * 10^(exp10 + 3)
    let digits: String = format!("{int_part}{frac_part}");
    let mantissa: u128 = if digits.is_empty() {
        0
    } else {
        digits.parse().map_err(|_| range())?
    };
    let scale = exp10 + 3 - i32::try_from(frac_part.len()).map_err(|_| range())?;
    let scaled = mantissa.checked_mul(mult).ok_or_else(range)?;
    let value = if scale >= 0 {
        let p = 10u128.checked_pow(scale.unsigned_abs()).ok_or_else(range)?;
        scaled.checked_mul(p).ok_or_else(range)?
    } else {
        let p = 10u128.checked_pow(scale.unsigned_abs()).ok_or_else(range)?;
        scaled.div_ceil(p)
    };
    if negative && value != 0 {
        return Err(QuantityError::Negative(text.to_string()));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_decimal_and_milli() {
        assert_eq!(Quantity::from("1Ki").value(), Ok(1024));
        assert_eq!(Quantity::from("2Gi").value(), Ok(2 << 30));
        assert_eq!(Quantity::from("1.5Gi").value(), Ok(3 << 29));
        assert_eq!(Quantity::from("512M").value(), Ok(512_000_000));
        assert_eq!(Quantity::from("500m").milli_value(), Ok(500));
        assert_eq!(Quantity::from("1500m").value(), Ok(2));
        assert_eq!(Quantity::from("2").milli_value(), Ok(2000));
        assert_eq!(Quantity::from("1e3").value(), Ok(1000));
    }

    #[test]
    fn rejects_garbage_and_overflow() {
        assert!(matches!(
            Quantity::from("lots").value(),
            Err(QuantityError::Syntax(_))
        ));
        assert!(matches!(
            Quantity::from("1.2.3").value(),
            Err(QuantityError::Syntax(_))
        ));
        assert!(matches!(
            Quantity::from("-1Gi").value(),
            Err(QuantityError::Negative(_))
        ));
        assert!(matches!(
            Quantity::from("99999999999999999999Ei").value(),
            Err(QuantityError::Range(_))
        ));
        assert!(matches!(
            Quantity::from("1e999").value(),
            Err(QuantityError::Range(_))
        ));
        assert!(Quantity::from("").value().is_err());
    }

    #[test]
    fn deserialises_from_text_or_number_only() {
        let q = |v| serde_json::from_value::<Quantity>(v);
        assert_eq!(q(serde_json::json!("2Gi")).unwrap().0, "2Gi");
        assert_eq!(q(serde_json::json!(1024)).unwrap().0, "1024");
        assert_eq!(q(serde_json::json!(-3)).unwrap().0, "-3");
        assert_eq!(q(serde_json::json!(1.5)).unwrap().0, "1.5");
        let e = q(serde_json::json!({"a": 1})).unwrap_err().to_string();
        assert!(
            e.contains("expected a quantity (a string such as 512Mi"),
            "{e}"
        );
    }
}
