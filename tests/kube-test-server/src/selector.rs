//! Label and field selectors, with the syntax of `labels.Parse` and `fields.ParseSelector`.

use serde_json::Value;

use crate::error::ApiError;

#[derive(Clone, Debug, PartialEq)]
enum Op {
    Eq(String),
    Ne(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
    Gt(i64),
    Lt(i64),
}

#[derive(Clone, Debug, PartialEq)]
struct Requirement {
    key: String,
    op: Op,
}

/// A parsed `labelSelector`; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelSelector(Vec<Requirement>);

/// Splits on commas that are not inside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn parse_set(s: &str) -> Option<Vec<String>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(
        inner
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect(),
    )
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 317
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

impl LabelSelector {
    /// Whether the selector selects everything (no requirements).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn parse(s: &str) -> Result<LabelSelector, ApiError> {
        let bad = |term: &str, why: &str| {
            ApiError::bad_request(format!(
                "unable to parse requirement: {why}: {term:?} in label selector {s:?}"
            ))
        };
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(LabelSelector(reqs));
        }
        for term in split_top(s) {
            let t = term.trim();
            if t.is_empty() {
                return Err(bad(t, "found '', expected: identifier"));
            }
            let req = if let Some(k) = t.strip_prefix('!') {
                Requirement {
                    key: k.trim().to_string(),
                    op: Op::NotExists,
                }
            } else if let Some((k, v)) = t.split_once("!=") {
                Requirement {
                    key: k.trim().to_string(),
                    op: Op::Ne(v.trim().to_string()),
                }
            } else if let Some((k, v)) = t.split_once("==") {
                Requirement {
                    key: k.trim().to_string(),
                    op: Op::Eq(v.trim().to_string()),
                }
            } else if let Some((k, v)) = t.split_once('=') {
                Requirement {
                    key: k.trim().to_string(),
                    op: Op::Eq(v.trim().to_string()),
                }
            } else if let Some((k, v)) = t.split_once(" notin ") {
                let set = parse_set(v).ok_or_else(|| bad(t, "expected a set like (a,b)"))?;
                Requirement {
                    key: k.trim().to_string(),
                    op: Op::NotIn(set),
                }
            } else if let Some((k, v)) = t.split_once(" in ") {
                let set = parse_set(v).ok_or_else(|| bad(t, "expected a set like (a,b)"))?;
                Requirement {
                    key: k.trim().to_string(),
                    op: Op::In(set),
                }
            } else if let Some((k, v)) = t.split_once('>') {
                let n = v
                    .trim()
                    .parse()
                    .map_err(|_| bad(t, "expected an integer"))?;
                Requirement {
                    key: k.trim().to_string(),
                    op: Op::Gt(n),
                }
            } else if let Some((k, v)) = t.split_once('<') {
                let n = v
                    .trim()
                    .parse()
                    .map_err(|_| bad(t, "expected an integer"))?;
                Requirement {
                    key: k.trim().to_string(),
                    op: Op::Lt(n),
                }
            } else {
                Requirement {
                    key: t.to_string(),
                    op: Op::Exists,
                }
            };
            if !valid_key(&req.key) {
                return Err(bad(t, "invalid label key"));
            }
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    /// Whether an object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match &r.op {
            Op::Eq(v) => get(&r.key) == Some(v.as_str()),
            Op::Ne(v) => get(&r.key) != Some(v.as_str()),
            Op::In(set) => get(&r.key).is_some_and(|x| set.iter().any(|s| s == x)),
            Op::NotIn(set) => get(&r.key).is_none_or(|x| !set.iter().any(|s| s == x)),
            Op::Exists => get(&r.key).is_some(),
            Op::NotExists => get(&r.key).is_none(),
            Op::Gt(n) => get(&r.key)
                .and_then(|x| x.parse::<i64>().ok())
                .is_some_and(|x| x > *n),
            Op::Lt(n) => get(&r.key)
                .and_then(|x| x.parse::<i64>().ok())
                .is_some_and(|x| x < *n),
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
struct FieldReq {
    path: String,
    value: String,
    equal: bool,
}

/// A parsed `fieldSelector` (`=`, `==`, `!=`, comma-separated).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldSelector(Vec<FieldReq>);

impl FieldSelector {
    /// Whether the selector selects everything (no requirements).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Parses a field selector. `allowed` says which field paths the resource supports
    /// (`None`: any dotted path).
    pub fn parse(s: &str, allowed: Option<&[&str]>) -> Result<FieldSelector, ApiError> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(FieldSelector(reqs));
        }
        for term in s.split(',') {
            let t = term.trim();
            let (path, value, equal) = if let Some((k, v)) = t.split_once("!=") {
                (k, v, false)
            } else if let Some((k, v)) = t.split_once("==") {
                (k, v, true)
            } else if let Some((k, v)) = t.split_once('=') {
                (k, v, true)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{s}'; can't understand '{t}'"
                )));
            };
            let path = path.trim().to_string();
            if let Some(allowed) = allowed
                && !allowed.contains(&path.as_str())
            {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {path}"
                )));
            }
            reqs.push(FieldReq {
                path,
                value: value.trim().to_string(),
                equal,
            });
        }
        Ok(FieldSelector(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|r| {
            let mut cur = Some(obj);
            for part in r.path.split('.') {
                cur = cur.and_then(|c| c.get(part));
            }
            let actual = match cur {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (actual == r.value) == r.equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors() {
        let obj = json!({"metadata": {"labels": {"app": "web", "tier": "front", "n": "5"}}});
        let m = |s: &str| LabelSelector::parse(s).map(|sel| sel.matches(&obj));
        assert_eq!(m("app=web").ok(), Some(true));
        assert_eq!(m("app==web,tier=front").ok(), Some(true));
        assert_eq!(m("app!=web").ok(), Some(false));
        assert_eq!(m("app in (db, web)").ok(), Some(true));
        assert_eq!(m("app notin (db,web)").ok(), Some(false));
        assert_eq!(m("tier,!missing").ok(), Some(true));
        assert_eq!(m("!app").ok(), Some(false));
        assert_eq!(m("missing notin (x)").ok(), Some(true));
        assert_eq!(m("n>4,n<6").ok(), Some(true));
        assert_eq!(m("").ok(), Some(true));
        assert!(LabelSelector::parse("app in web").is_err());
        assert!(LabelSelector::parse("a b=c").is_err());
    }

    #[test]
    fn field_selectors() {
        let obj = json!({"metadata": {"name": "x", "namespace": "ns"}});
        let allowed: &[&str] = &["metadata.name", "metadata.namespace"];
        let m = |s: &str| FieldSelector::parse(s, Some(allowed)).map(|f| f.matches(&obj));
        assert_eq!(m("metadata.name=x").ok(), Some(true));
        assert_eq!(
            m("metadata.name==x,metadata.namespace!=other").ok(),
            Some(true)
        );
        assert_eq!(m("metadata.namespace!=ns").ok(), Some(false));
        assert!(m("spec.x=1").is_err());
    }
}
