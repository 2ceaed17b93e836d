//! A minimal decoder of Kubernetes protobuf request bodies, for the typed writes kubectl sends
//! as `application/vnd.kubernetes.protobuf` (`kubectl create secret|configmap|namespace`).
//! Only Secret, ConfigMap and Namespace are understood; anything else is refused with 415.

use serde_json::{Map, Value, json};

use crate::error::ApiError;

#[derive(Debug)]
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

/// Iterates the (field number, value) pairs of one protobuf message.
fn fields(mut buf: &[u8]) -> Result<Vec<(u64, Field<'_>)>, String> {
    fn varint(buf: &mut &[u8]) -> Result<u64, String> {
        let mut out = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = buf.split_first().ok_or("truncated varint")?;
            *buf = rest;
            out |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(out);
            }
        }
        Err("varint too long".into())
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let (num, wire) = (key >> 3, key & 7);
        match wire {
            0 => out.push((num, Field::Varint(varint(&mut buf)?))),
            1 => {
                buf = buf.get(8..).ok_or("truncated fixed64")?;
            }
            2 => {
                let len = usize::try_from(varint(&mut buf)?).map_err(|_| "length overflow")?;
                let data = buf.get(..len).ok_or("truncated bytes")?;
                buf = &buf[len..];
                out.push((num, Field::Bytes(data)));
            }
            5 => {
                buf = buf.get(4..).ok_or("truncated fixed32")?;
            }
            w => return Err(format!("unsupported wire type {w}")),
        }
    }
    Ok(out)
}

fn string(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A `map<string, string|bytes>` entry (key = 1, value = 2).
fn map_entry(b: &[u8], bytes_value: bool) -> Result<(String, Value), String> {
    let mut k = String::new();
    let mut v = Value::String(String::new());
    for (n, f) in fields(b)? {
        if let Field::Bytes(d) = f {
            match n {
                1 => k = string(d),
                2 if bytes_value => v = Value::String(crate::util::base64(d)),
                2 => v = Value::String(string(d)),
                _ => {}
            }
        }
    }
    Ok((k, v))
}

fn insert_entry(map: &mut Map<String, Value>, field: &str, entry: (String, Value)) {
    let m = map
        .entry(field)
        .or_insert_with(|| Value::Object(Map::new()));
    if let Some(m) = m.as_object_mut() {
        m.insert(entry.0, entry.1);
    }
}

fn object_meta(b: &[u8]) -> Result<Value, String> {
    let mut m = Map::new();
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Bytes(d)) => {
                m.insert("name".into(), Value::String(string(d)));
            }
            (2, Field::Bytes(d)) => {
                m.insert("generateName".into(), Value::String(string(d)));
            }
            (3, Field::Bytes(d)) => {
                m.insert("namespace".into(), Value::String(string(d)));
            }
            (6, Field::Bytes(d)) => {
                m.insert("resourceVersion".into(), Value::String(string(d)));
            }
            (11, Field::Bytes(d)) => insert_entry(&mut m, "labels", map_entry(d, false)?),
            (12, Field::Bytes(d)) => insert_entry(&mut m, "annotations", map_entry(d, false)?),
            (14, Field::Bytes(d)) => {
                let list = m
                    .entry("finalizers")
                    .or_insert_with(|| Value::Array(Vec::new()));
                if let Some(a) = list.as_array_mut() {
                    a.push(Value::String(string(d)));
                }
            }
            _ => {}
        }
    }
    Ok(Value::Object(m))
}

fn decode_kind(kind: &str, raw: &[u8]) -> Result<Value, String> {
    let mut obj = Map::new();
    for (n, f) in fields(raw)? {
        match (kind, n, f) {
            (_, 1, Field::Bytes(d)) => {
                obj.insert("metadata".into(), object_meta(d)?);
            }
            ("Secret", 2, Field::Bytes(d)) => insert_entry(&mut obj, "data", map_entry(d, true)?),
            ("Secret", 3, Field::Bytes(d)) => {
                obj.insert("type".into(), Value::String(string(d)));
            }
            ("Secret", 4, Field::Bytes(d)) => {
                insert_entry(&mut obj, "stringData", map_entry(d, false)?)
            }
            ("Secret", 5, Field::Varint(v)) | ("ConfigMap", 4, Field::Varint(v)) => {
                obj.insert("immutable".into(), Value::Bool(v != 0));
            }
            ("ConfigMap", 2, Field::Bytes(d)) => {
                insert_entry(&mut obj, "data", map_entry(d, false)?)
            }
            ("ConfigMap", 3, Field::Bytes(d)) => {
                insert_entry(&mut obj, "binaryData", map_entry(d, true)?)
            }
            _ => {}
        }
    }
    Ok(Value::Object(obj))
}

/// Decodes a `k8s\0`-prefixed protobuf body into the JSON object it encodes.
pub fn decode(body: &[u8]) -> Result<Value, ApiError> {
    let unsupported = |what: &str| {
        ApiError::unsupported_media_type(
            &format!("application/vnd.kubernetes.protobuf ({what})"),
            &["application/json", "application/yaml"],
        )
    };
    let rest = body
        .strip_prefix(b"k8s\0")
        .ok_or_else(|| ApiError::bad_request("protobuf body without the k8s envelope"))?;
    let mut api_version = String::new();
    let mut kind = String::new();
    let mut raw: &[u8] = &[];
    for (n, f) in fields(rest).map_err(ApiError::bad_request)? {
        match (n, f) {
            (1, Field::Bytes(tm)) => {
                for (tn, tf) in fields(tm).map_err(ApiError::bad_request)? {
                    match (tn, tf) {
                        (1, Field::Bytes(d)) => api_version = string(d),
                        (2, Field::Bytes(d)) => kind = string(d),
                        _ => {}
                    }
                }
            }
            (2, Field::Bytes(d)) => raw = d,
            _ => {}
        }
    }
    if !matches!(kind.as_str(), "Secret" | "ConfigMap" | "Namespace") {
        return Err(unsupported(&kind));
    }
    let mut obj = decode_kind(&kind, raw).map_err(ApiError::bad_request)?;
    if let Some(m) = obj.as_object_mut() {
        m.insert("apiVersion".into(), json!(api_version));
        m.insert("kind".into(), json!(kind));
    }
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(num: u8, data: &[u8]) -> Vec<u8> {
        let mut v = vec![(num << 3) | 2, data.len() as u8];
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn decodes_a_secret() {
        let meta = [field(1, b"s1"), field(3, b"ns")].concat();
        let entry = [field(1, b"token"), field(2, b"abc")].concat();
        let secret = [field(1, &meta), field(2, &entry), field(3, b"Opaque")].concat();
        let tm = [field(1, b"v1"), field(2, b"Secret")].concat();
        let body = [b"k8s\0".to_vec(), field(1, &tm), field(2, &secret)].concat();
        let v = decode(&body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                   "metadata": {"name": "s1", "namespace": "ns"}, "data": {"token": "YWJj"}})
        );
        assert!(decode(b"k8s\0\x0a\x05").is_err());
        assert!(decode(b"nope").is_err());
    }
}
