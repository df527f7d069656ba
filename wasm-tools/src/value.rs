//! JSON ⇄ component values, guided by the function's component-model types.
//!
//! The encoding is documented in [`crate::schema`]. Conversion errors carry the
//! JSON path of the bad field, e.g. `args.filter.limit: expected u32, got -3`.

use crate::schema::type_name;
use serde_json::{Map, Number, Value};
use wasmtime::component::Val;
use wasmtime::component::types::Type;

/// A value did not fit the type it had to have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ValueError {
    /// Where in the document the value sits (`args.filter.limit`, `result[2]`).
    pub path: String,
    /// What is wrong, in the form `expected <type>, got <what>`.
    pub message: String,
}

impl ValueError {
    fn new(path: &str, message: impl Into<String>) -> Self {
        Self {
            path: path.to_string(),
            message: message.into(),
        }
    }
    fn expected(path: &str, what: &str, got: &Value) -> Self {
        Self::new(path, format!("expected {what}, got {}", describe(got)))
    }
}

/// Short description of a JSON value for error messages; long values are cut.
fn describe(v: &Value) -> String {
    let s = match v {
        Value::String(s) => format!("string {:?}", s),
        Value::Array(a) => format!("array of {} item(s)", a.len()),
        Value::Object(o) => format!("object with {} key(s)", o.len()),
        other => other.to_string(),
    };
    if s.chars().count() > 80 {
        let cut: String = s.chars().take(77).collect();
        format!("{cut}...")
    } else {
        s
    }
}

/// Convert a JSON value at `path` into a component value of type `ty`.
///
/// # Errors
/// A [`ValueError`] naming the path of the first field that does not fit.
pub fn json_to_val(ty: &Type, v: &Value, path: &str) -> Result<Val, ValueError> {
    Ok(match ty {
        Type::Bool => Val::Bool(
            v.as_bool()
                .ok_or_else(|| ValueError::expected(path, "bool", v))?,
        ),
        Type::S8 => Val::S8(int(v, path, ty)?),
        Type::U8 => Val::U8(int(v, path, ty)?),
        Type::S16 => Val::S16(int(v, path, ty)?),
        Type::U16 => Val::U16(int(v, path, ty)?),
        Type::S32 => Val::S32(int(v, path, ty)?),
        Type::U32 => Val::U32(int(v, path, ty)?),
        Type::S64 => Val::S64(int(v, path, ty)?),
        Type::U64 => Val::U64(int(v, path, ty)?),
        Type::Float32 => Val::Float32(float(v, path, "f32")? as f32),
        Type::Float64 => Val::Float64(float(v, path, "f64")?),
        Type::Char => {
            let s = v
                .as_str()
                .ok_or_else(|| ValueError::expected(path, "char", v))?;
            let mut it = s.chars();
            match (it.next(), it.next()) {
                (Some(c), None) => Val::Char(c),
                _ => {
                    return Err(ValueError::expected(
                        path,
                        "char (exactly one character)",
                        v,
                    ));
                }
            }
        }
        Type::String => Val::String(
            v.as_str()
                .ok_or_else(|| ValueError::expected(path, "string", v))?
                .to_string(),
        ),
        Type::List(l) => {
            let arr = v
                .as_array()
                .ok_or_else(|| ValueError::expected(path, "list", v))?;
            let elem = l.ty();
            Val::List(items(&elem, arr, path)?)
        }
        Type::FixedLengthList(l) => {
            let arr = v
                .as_array()
                .ok_or_else(|| ValueError::expected(path, "list", v))?;
            if arr.len() != l.len() as usize {
                return Err(ValueError::new(
                    path,
                    format!(
                        "expected a list of exactly {} item(s), got {}",
                        l.len(),
                        arr.len()
                    ),
                ));
            }
            Val::FixedLengthList(items(&l.ty(), arr, path)?)
        }
        Type::Map(m) => {
            let arr = v
                .as_array()
                .ok_or_else(|| ValueError::expected(path, "map (list of [key, value] pairs)", v))?;
            let (kt, vt) = (m.key(), m.value());
            let mut out = Vec::with_capacity(arr.len());
            for (i, pair) in arr.iter().enumerate() {
                let p = format!("{path}[{i}]");
                match pair.as_array().map(|a| a.as_slice()) {
                    Some([k, val]) => out.push((
                        json_to_val(&kt, k, &format!("{p}[0]"))?,
                        json_to_val(&vt, val, &format!("{p}[1]"))?,
                    )),
                    _ => return Err(ValueError::expected(&p, "[key, value] pair", pair)),
                }
            }
            Val::Map(out)
        }
        Type::Tuple(t) => {
            let arr = v
                .as_array()
                .ok_or_else(|| ValueError::expected(path, "tuple (array)", v))?;
            let types: Vec<Type> = t.types().collect();
            if arr.len() != types.len() {
                return Err(ValueError::new(
                    path,
                    format!(
                        "expected a tuple of {} item(s), got {}",
                        types.len(),
                        arr.len()
                    ),
                ));
            }
            let mut out = Vec::with_capacity(arr.len());
            for (i, (t, x)) in types.iter().zip(arr).enumerate() {
                out.push(json_to_val(t, x, &format!("{path}[{i}]"))?);
            }
            Val::Tuple(out)
        }
        Type::Record(r) => {
            let obj = v
                .as_object()
                .ok_or_else(|| ValueError::expected(path, "record (object)", v))?;
            let mut out = Vec::new();
            let mut known = Vec::new();
            for f in r.fields() {
                known.push(f.name);
                let p = join(path, f.name);
                let x = obj
                    .get(f.name)
                    .ok_or_else(|| ValueError::new(&p, "missing required field"))?;
                out.push((f.name.to_string(), json_to_val(&f.ty, x, &p)?));
            }
            reject_unknown(obj, &known, path)?;
            Val::Record(out)
        }
        Type::Variant(var) => {
            let (name, payload) = single_key(v, path, "variant")?;
            let case = var.cases().find(|c| c.name == name).ok_or_else(|| {
                let names: Vec<&str> = var.cases().map(|c| c.name).collect();
                ValueError::new(
                    path,
                    format!("unknown case {name:?}, expected one of {names:?}"),
                )
            })?;
            let p = join(path, name);
            let payload = match &case.ty {
                Some(t) => Some(Box::new(json_to_val(t, payload, &p)?)),
                None if payload.is_null() => None,
                None => {
                    return Err(ValueError::expected(
                        &p,
                        "null (case has no payload)",
                        payload,
                    ));
                }
            };
            Val::Variant(name.to_string(), payload)
        }
        Type::Enum(e) => {
            let s = v
                .as_str()
                .ok_or_else(|| ValueError::expected(path, "enum (string)", v))?;
            if !e.names().any(|n| n == s) {
                let names: Vec<&str> = e.names().collect();
                return Err(ValueError::new(
                    path,
                    format!("unknown case {s:?}, expected one of {names:?}"),
                ));
            }
            Val::Enum(s.to_string())
        }
        Type::Flags(f) => {
            let arr = v
                .as_array()
                .ok_or_else(|| ValueError::expected(path, "flags (array of names)", v))?;
            let mut out: Vec<String> = Vec::new();
            for (i, x) in arr.iter().enumerate() {
                let p = format!("{path}[{i}]");
                let s = x
                    .as_str()
                    .ok_or_else(|| ValueError::expected(&p, "flag name (string)", x))?;
                if !f.names().any(|n| n == s) {
                    let names: Vec<&str> = f.names().collect();
                    return Err(ValueError::new(
                        &p,
                        format!("unknown flag {s:?}, expected one of {names:?}"),
                    ));
                }
                if out.iter().any(|o| o == s) {
                    return Err(ValueError::new(&p, format!("flag {s:?} given twice")));
                }
                out.push(s.to_string());
            }
            Val::Flags(out)
        }
        Type::Option(o) => {
            let inner_ty = o.ty();
            if v.is_null() {
                Val::Option(None)
            } else if matches!(inner_ty, Type::Option(_)) {
                let (name, payload) = single_key(v, path, "option (null or {\"some\": value})")?;
                if name != "some" {
                    return Err(ValueError::new(
                        path,
                        format!("expected key \"some\", got {name:?}"),
                    ));
                }
                Val::Option(Some(Box::new(json_to_val(
                    &inner_ty,
                    payload,
                    &join(path, "some"),
                )?)))
            } else {
                Val::Option(Some(Box::new(json_to_val(&inner_ty, v, path)?)))
            }
        }
        Type::Result(r) => {
            let (name, payload) = single_key(v, path, "result ({\"ok\": ...} or {\"err\": ...})")?;
            let p = join(path, name);
            let conv = |t: Option<Type>| -> Result<Option<Box<Val>>, ValueError> {
                match t {
                    Some(t) => Ok(Some(Box::new(json_to_val(&t, payload, &p)?))),
                    None if payload.is_null() => Ok(None),
                    None => Err(ValueError::expected(&p, "null (no payload)", payload)),
                }
            };
            match name {
                "ok" => Val::Result(Ok(conv(r.ok())?)),
                "err" => Val::Result(Err(conv(r.err())?)),
                other => {
                    return Err(ValueError::new(
                        path,
                        format!("expected key \"ok\" or \"err\", got {other:?}"),
                    ));
                }
            }
        }
        Type::Own(_) | Type::Borrow(_) | Type::Future(_) | Type::Stream(_) | Type::ErrorContext => {
            return Err(ValueError::new(
                path,
                format!("a {} cannot be passed as JSON", type_name(ty)),
            ));
        }
    })
}

/// Convert a component value back to JSON, in the encoding of [`crate::schema`].
///
/// # Errors
/// Values that have no JSON form (resources, futures, streams) are reported
/// with their path.
pub fn val_to_json(val: &Val, path: &str) -> Result<Value, ValueError> {
    Ok(match val {
        Val::Bool(b) => Value::Bool(*b),
        Val::S8(x) => Value::from(*x),
        Val::U8(x) => Value::from(*x),
        Val::S16(x) => Value::from(*x),
        Val::U16(x) => Value::from(*x),
        Val::S32(x) => Value::from(*x),
        Val::U32(x) => Value::from(*x),
        Val::S64(x) => Value::from(*x),
        Val::U64(x) => Value::from(*x),
        Val::Float32(x) => float_json(f64::from(*x)),
        Val::Float64(x) => float_json(*x),
        Val::Char(c) => Value::String(c.to_string()),
        Val::String(s) => Value::String(s.clone()),
        Val::List(xs) | Val::Tuple(xs) | Val::FixedLengthList(xs) => Value::Array(
            xs.iter()
                .enumerate()
                .map(|(i, x)| val_to_json(x, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Val::Map(pairs) => Value::Array(
            pairs
                .iter()
                .enumerate()
                .map(|(i, (k, v))| {
                    Ok(Value::Array(vec![
                        val_to_json(k, &format!("{path}[{i}][0]"))?,
                        val_to_json(v, &format!("{path}[{i}][1]"))?,
                    ]))
                })
                .collect::<Result<_, ValueError>>()?,
        ),
        Val::Record(fields) => {
            let mut m = Map::new();
            for (name, x) in fields {
                m.insert(name.clone(), val_to_json(x, &join(path, name))?);
            }
            Value::Object(m)
        }
        Val::Variant(name, payload) => {
            let inner = match payload {
                Some(p) => val_to_json(p, &join(path, name))?,
                None => Value::Null,
            };
            one(name, inner)
        }
        Val::Enum(name) => Value::String(name.clone()),
        Val::Flags(names) => Value::Array(names.iter().cloned().map(Value::String).collect()),
        Val::Option(None) => Value::Null,
        Val::Option(Some(inner)) => {
            let j = val_to_json(inner, path)?;
            if matches!(**inner, Val::Option(_)) {
                one("some", j)
            } else {
                j
            }
        }
        Val::Result(r) => {
            let (key, payload) = match r {
                Ok(p) => ("ok", p),
                Err(p) => ("err", p),
            };
            let inner = match payload {
                Some(p) => val_to_json(p, &join(path, key))?,
                None => Value::Null,
            };
            one(key, inner)
        }
        Val::Resource(_) | Val::Future(_) | Val::Stream(_) | Val::ErrorContext(_) => {
            return Err(ValueError::new(
                path,
                "resources, futures and streams have no JSON form",
            ));
        }
    })
}

/// A lower bound on the size of `val_to_json(val)` serialized (strings
/// count their bytes and quotes, everything else at least a byte). Cheap,
/// allocates nothing: a result can be refused as too large before its JSON
/// is built.
pub fn json_size_at_least(val: &Val) -> u64 {
    // Separators are left out: a lower bound, never more than the JSON.
    let many =
        |xs: &mut dyn Iterator<Item = &Val>| -> u64 { 2 + xs.map(json_size_at_least).sum::<u64>() };
    match val {
        Val::String(s) => s.len() as u64 + 2,
        Val::Char(c) => c.len_utf8() as u64 + 2,
        Val::Enum(name) => name.len() as u64 + 2,
        Val::List(xs) | Val::Tuple(xs) | Val::FixedLengthList(xs) => many(&mut xs.iter()),
        Val::Map(pairs) => many(&mut pairs.iter().flat_map(|(k, v)| [k, v])),
        Val::Record(fields) => {
            2 + fields
                .iter()
                .map(|(name, x)| name.len() as u64 + 3 + json_size_at_least(x))
                .sum::<u64>()
        }
        Val::Flags(names) => 2 + names.iter().map(|n| n.len() as u64 + 2).sum::<u64>(),
        Val::Variant(name, Some(p)) => name.len() as u64 + 5 + json_size_at_least(p),
        Val::Option(Some(p)) => json_size_at_least(p),
        Val::Result(Ok(Some(p)) | Err(Some(p))) => 6 + json_size_at_least(p),
        _ => 1,
    }
}

fn float_json(x: f64) -> Value {
    match Number::from_f64(x) {
        Some(n) => Value::Number(n),
        None if x.is_nan() => Value::String("NaN".into()),
        None if x > 0.0 => Value::String("Infinity".into()),
        None => Value::String("-Infinity".into()),
    }
}

fn float(v: &Value, path: &str, what: &str) -> Result<f64, ValueError> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| ValueError::expected(path, what, v)),
        Value::String(s) if s == "NaN" => Ok(f64::NAN),
        Value::String(s) if s == "Infinity" => Ok(f64::INFINITY),
        Value::String(s) if s == "-Infinity" => Ok(f64::NEG_INFINITY),
        _ => Err(ValueError::expected(path, what, v)),
    }
}

fn int<T: TryFrom<i128>>(v: &Value, path: &str, ty: &Type) -> Result<T, ValueError> {
    let name = type_name(ty);
    let Value::Number(n) = v else {
        return Err(ValueError::expected(path, name, v));
    };
    let wide: i128 = if let Some(i) = n.as_i64() {
        i128::from(i)
    } else if let Some(u) = n.as_u64() {
        i128::from(u)
    } else {
        // A float: accept only integral values, as JSON writers often emit 3.0.
        let f = n.as_f64().unwrap_or(f64::NAN);
        if f.fract() != 0.0 || !f.is_finite() || f.abs() > 1.8e19 {
            return Err(ValueError::expected(path, name, v));
        }
        f as i128
    };
    T::try_from(wide).map_err(|_| ValueError::expected(path, name, v))
}

fn items(elem: &Type, arr: &[Value], path: &str) -> Result<Vec<Val>, ValueError> {
    arr.iter()
        .enumerate()
        .map(|(i, x)| json_to_val(elem, x, &format!("{path}[{i}]")))
        .collect()
}

fn single_key<'a>(
    v: &'a Value,
    path: &str,
    what: &str,
) -> Result<(&'a str, &'a Value), ValueError> {
    match v.as_object() {
        Some(o) if o.len() == 1 => {
            let (k, x) = o.iter().next().expect("one entry");
            Ok((k.as_str(), x))
        }
        Some(o) => Err(ValueError::new(
            path,
            format!(
                "expected {what} as an object with exactly one key, got {} keys",
                o.len()
            ),
        )),
        // A bare string names a case without payload: accept it for variants.
        None => match v.as_str() {
            Some(s) if what == "variant" => Ok((s, &Value::Null)),
            _ => Err(ValueError::expected(path, what, v)),
        },
    }
}

fn reject_unknown(obj: &Map<String, Value>, known: &[&str], path: &str) -> Result<(), ValueError> {
    for k in obj.keys() {
        if !known.contains(&k.as_str()) {
            return Err(ValueError::new(
                &join(path, k),
                format!("unknown field, expected one of {known:?}"),
            ));
        }
    }
    Ok(())
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn one(key: &str, v: Value) -> Value {
    let mut m = Map::new();
    m.insert(key.to_string(), v);
    Value::Object(m)
}

/// Convert a JSON object of named arguments into the parameter list of a function.
///
/// `params` are the function's `(name, type)` pairs in order. Every parameter is
/// required (an `option<T>` parameter may be omitted and becomes `none`); unknown
/// keys are rejected.
///
/// # Errors
/// A [`ValueError`] whose path starts with `args`.
pub fn args_to_vals(params: &[(String, Type)], args: &Value) -> Result<Vec<Val>, ValueError> {
    let empty = Map::new();
    let obj = match args {
        Value::Object(o) => o,
        Value::Null if params.is_empty() => &empty,
        other => {
            return Err(ValueError::expected(
                "args",
                "an object of named arguments",
                other,
            ));
        }
    };
    let mut out = Vec::with_capacity(params.len());
    for (name, ty) in params {
        let p = join("args", name);
        match obj.get(name) {
            Some(v) => out.push(json_to_val(ty, v, &p)?),
            None if matches!(ty, Type::Option(_)) => out.push(Val::Option(None)),
            None => return Err(ValueError::new(&p, "missing required argument")),
        }
    }
    let known: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
    reject_unknown(obj, &known, "args")?;
    Ok(out)
}

#[cfg(test)]
mod size_tests {
    use super::*;

    #[test]
    fn the_size_bound_never_exceeds_the_real_json_size() {
        let vals = [
            Val::String("a\u{1}b\"c".into()),
            Val::List(vec![
                Val::U64(12345),
                Val::Bool(true),
                Val::String("xyz".into()),
            ]),
            Val::Record(vec![
                ("name".into(), Val::String("Ada".into())),
                ("tags".into(), Val::Flags(vec!["x".into(), "yy".into()])),
            ]),
            Val::Result(Ok(Some(Box::new(Val::String("ok".into()))))),
            Val::Variant("circle".into(), Some(Box::new(Val::Float64(1.5)))),
            Val::Option(Some(Box::new(Val::Enum("red".into())))),
            Val::Option(None),
        ];
        for v in &vals {
            let real = serde_json::to_vec(&val_to_json(v, "result").unwrap())
                .unwrap()
                .len() as u64;
            let bound = json_size_at_least(v);
            assert!(bound <= real, "{v:?}: bound {bound} > real {real}");
        }
        let big = Val::String("r".repeat(1 << 20));
        assert!(json_size_at_least(&big) > 1 << 20);
    }
}
