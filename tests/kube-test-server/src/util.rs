//! Small helpers: time stamps, identifiers, encodings, query strings.

use rand::Rng;
use serde_json::Value;

/// Now, as RFC 3339 with whole seconds in UTC (`2026-01-02T03:04:05Z`), like `metav1.Time`.
pub fn now_rfc3339() -> String {
    let now = jiff::Timestamp::now();
    jiff::Timestamp::from_second(now.as_second())
        .unwrap_or(now)
        .to_string()
}

/// Seconds since a `metav1.Time` string, if it parses.
pub fn age_seconds(ts: &str) -> Option<i64> {
    let t: jiff::Timestamp = ts.parse().ok()?;
    Some(jiff::Timestamp::now().as_second() - t.as_second())
}

/// kube's `duration.HumanDuration`: `5s`, `3m2s`, `45m`, `5h3m`, `3d4h`, `120d`, `2y30d`.
pub fn human_duration(secs: i64) -> String {
    let s = secs.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86400);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        let r = s % 60;
        if r == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{r}s")
        }
    } else if h < 3 {
        format!("{m}m")
    } else if h < 8 {
        let r = m % 60;
        if r == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{r}m")
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 192 {
        let r = h % 24;
        if r == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{r}h")
        }
    } else if d < 365 * 2 {
        format!("{d}d")
    } else {
        let y = d / 365;
        let r = d % 365;
        if r == 0 {
            format!("{y}y")
        } else {
            format!("{y}y{r}d")
        }
    }
}

/// A random (version 4) UUID.
pub fn uuid4() -> String {
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The 5-character suffix `generateName` gets, from the API server's alphabet.
pub fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Standard base64 with padding (for Secret `stringData` → `data`).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

const URL_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// URL-safe base64 without padding (Go's `base64.RawURLEncoding`, continue tokens).
pub fn base64_raw_url(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(URL_ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
        }
    }
    out
}

/// Decodes Go's `base64.RawURLEncoding`; the error is Go's `CorruptInputError` text.
pub fn base64_raw_url_decode(s: &str) -> Result<Vec<u8>, String> {
    let corrupt = |i: usize| format!("illegal base64 data at input byte {i}");
    let mut sextets = Vec::with_capacity(s.len());
    for (i, c) in s.bytes().enumerate() {
        match URL_ALPHABET.iter().position(|&a| a == c) {
            Some(v) => sextets.push(v as u32),
            None => return Err(corrupt(i)),
        }
    }
    if sextets.len() % 4 == 1 {
        // A lone last character cannot hold a byte.
        return Err(corrupt(sextets.len() - 1));
    }
    let mut out = Vec::with_capacity(sextets.len() * 3 / 4);
    for chunk in sextets.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, v)| n | (v << (18 - 6 * i)));
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Ok(out)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a query string into (key, value) pairs, percent-decoded.
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

/// Percent-decodes one path segment.
pub fn decode_segment(s: &str) -> String {
    percent_decode(&s.replace('+', "%2B"))
}

/// `metadata.<field>` as a string, or "".
pub fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// A mutable `metadata` map, created when missing (or replaced when not an object).
pub fn meta_mut(obj: &mut Value) -> Option<&mut serde_json::Map<String, Value>> {
    let map = obj.as_object_mut()?;
    let meta = map
        .entry("metadata")
        .or_insert_with(|| Value::Object(Default::default()));
    if !meta.is_object() {
        *meta = Value::Object(Default::default());
    }
    meta.as_object_mut()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        assert_eq!(base64(b"hello"), "aGVsbG8=");
        assert_eq!(base64(b"hi!"), "aGkh");
        assert_eq!(base64(b"h"), "aA==");
        for data in [&b""[..], b"h", b"hi", b"hi!", b"{\"rv\":12}"] {
            assert_eq!(
                base64_raw_url_decode(&base64_raw_url(data)).as_deref(),
                Ok(data)
            );
        }
        assert_eq!(base64_raw_url(b"\xfb\xff"), "-_8");
        assert_eq!(
            base64_raw_url_decode("ab%c"),
            Err("illegal base64 data at input byte 2".to_string())
        );
        assert_eq!(
            base64_raw_url_decode("abcde"),
            Err("illegal base64 data at input byte 4".to_string())
        );
        assert_eq!(
            parse_query("labelSelector=app%3Dweb%2Ctier+in+(a)&watch"),
            vec![
                ("labelSelector".into(), "app=web,tier in (a)".into()),
                ("watch".into(), String::new())
            ]
        );
        assert_eq!(parse_query("a=%zz%4"), vec![("a".into(), "%zz%4".into())]);
        let u = uuid4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(185), "3m5s");
        assert_eq!(human_duration(3 * 3600 + 60), "3h1m");
    }
}
