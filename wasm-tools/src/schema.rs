//! Component-model types → JSON Schema (draft 2020-12).
//!
//! The JSON encoding (mirrored exactly by [`crate::value`]):
//!
//! | WIT type | JSON |
//! |---|---|
//! | `bool` | boolean |
//! | integers | integer with `minimum`/`maximum` of the type |
//! | `f32`, `f64` | number; non-finite values as the strings `"NaN"`, `"Infinity"`, `"-Infinity"` |
//! | `char` | string of exactly one Unicode scalar value |
//! | `string` | string |
//! | `list<T>` | array of T |
//! | `tuple<A, B>` | array with `prefixItems` of fixed length |
//! | `record` | object with every field required, no extra properties |
//! | `variant` | object with exactly one property named after the case (`null` payload for cases without one) |
//! | `enum` | string, one of the case names |
//! | `flags` | array of unique flag names |
//! | `option<T>` | `null` or T (`option<option<T>>`: inner options as `{"some": T}`) |
//! | `result<T, E>` | `{"ok": T}` or `{"err": E}` (`null` payloads when absent) |

use serde_json::{Map, Value, json};
use wasmtime::component::types::Type;

/// JSON Schema for a value of component type `ty`.
///
/// Returns `None` for types that cannot cross a JSON boundary (resources,
/// futures, streams, error contexts); the caller decides what to do with
/// such functions.
pub fn type_schema(ty: &Type) -> Option<Value> {
    Some(match ty {
        Type::Bool => json!({"type": "boolean"}),
        Type::S8 => int_schema(i8::MIN as i128, i8::MAX as i128),
        Type::U8 => int_schema(0, u8::MAX as i128),
        Type::S16 => int_schema(i16::MIN as i128, i16::MAX as i128),
        Type::U16 => int_schema(0, u16::MAX as i128),
        Type::S32 => int_schema(i32::MIN as i128, i32::MAX as i128),
        Type::U32 => int_schema(0, u32::MAX as i128),
        Type::S64 => int_schema(i64::MIN as i128, i64::MAX as i128),
        Type::U64 => int_schema(0, u64::MAX as i128),
        Type::Float32 | Type::Float64 => json!({
            "anyOf": [{"type": "number"}, {"enum": ["NaN", "Infinity", "-Infinity"]}]
        }),
        Type::Char => json!({"type": "string", "minLength": 1, "maxLength": 1,
            "description": "a single Unicode scalar value"}),
        Type::String => json!({"type": "string"}),
        Type::List(l) => json!({"type": "array", "items": type_schema(&l.ty())?}),
        Type::FixedLengthList(l) => {
            let n = l.len();
            json!({"type": "array", "items": type_schema(&l.ty())?, "minItems": n, "maxItems": n})
        }
        Type::Map(m) => {
            // Encoded as a list of [key, value] pairs: keys need not be strings.
            json!({"type": "array", "items": {
                "type": "array",
                "prefixItems": [type_schema(&m.key())?, type_schema(&m.value())?],
                "items": false, "minItems": 2, "maxItems": 2
            }})
        }
        Type::Tuple(t) => {
            let items: Option<Vec<Value>> = t.types().map(|t| type_schema(&t)).collect();
            let items = items?;
            let n = items.len();
            json!({"type": "array", "prefixItems": items, "items": false,
                   "minItems": n, "maxItems": n})
        }
        Type::Record(r) => {
            let mut props = Map::new();
            let mut required = Vec::new();
            for f in r.fields() {
                props.insert(f.name.to_string(), type_schema(&f.ty)?);
                required.push(Value::String(f.name.to_string()));
            }
            json!({"type": "object", "properties": props, "required": required,
                   "additionalProperties": false})
        }
        Type::Variant(v) => {
            let mut one_of = Vec::new();
            for c in v.cases() {
                let payload = match &c.ty {
                    Some(t) => type_schema(t)?,
                    None => json!({"type": "null"}),
                };
                one_of.push(single_key_object(c.name, payload));
            }
            json!({"oneOf": one_of})
        }
        Type::Enum(e) => {
            let names: Vec<&str> = e.names().collect();
            json!({"type": "string", "enum": names})
        }
        Type::Flags(f) => {
            let names: Vec<&str> = f.names().collect();
            json!({"type": "array", "items": {"type": "string", "enum": names},
                   "uniqueItems": true})
        }
        Type::Option(o) => {
            let inner_ty = o.ty();
            let inner = type_schema(&inner_ty)?;
            let inner = if matches!(inner_ty, Type::Option(_)) {
                single_key_object("some", inner)
            } else {
                inner
            };
            json!({"anyOf": [{"type": "null"}, inner]})
        }
        Type::Result(r) => {
            let ok = match r.ok() {
                Some(t) => type_schema(&t)?,
                None => json!({"type": "null"}),
            };
            let err = match r.err() {
                Some(t) => type_schema(&t)?,
                None => json!({"type": "null"}),
            };
            json!({"oneOf": [single_key_object("ok", ok), single_key_object("err", err)]})
        }
        Type::Own(_) | Type::Borrow(_) | Type::Future(_) | Type::Stream(_) | Type::ErrorContext => {
            return None;
        }
    })
}

/// Short human name of a type, used in error messages (`expected u32, got -3`).
pub fn type_name(ty: &Type) -> &'static str {
    match ty {
        Type::Bool => "bool",
        Type::S8 => "s8",
        Type::U8 => "u8",
        Type::S16 => "s16",
        Type::U16 => "u16",
        Type::S32 => "s32",
        Type::U32 => "u32",
        Type::S64 => "s64",
        Type::U64 => "u64",
        Type::Float32 => "f32",
        Type::Float64 => "f64",
        Type::Char => "char",
        Type::String => "string",
        Type::List(_) => "list",
        Type::FixedLengthList(_) => "fixed-length list",
        Type::Map(_) => "map",
        Type::Record(_) => "record",
        Type::Tuple(_) => "tuple",
        Type::Variant(_) => "variant",
        Type::Enum(_) => "enum",
        Type::Option(_) => "option",
        Type::Result(_) => "result",
        Type::Flags(_) => "flags",
        Type::Own(_) => "own resource",
        Type::Borrow(_) => "borrowed resource",
        Type::Future(_) => "future",
        Type::Stream(_) => "stream",
        Type::ErrorContext => "error-context",
    }
}

fn int_schema(min: i128, max: i128) -> Value {
    // i128 is not a serde_json number; go through the widest fitting type.
    let num = |v: i128| -> Value {
        if v < 0 {
            Value::from(v as i64)
        } else {
            Value::from(v as u64)
        }
    };
    json!({"type": "integer", "minimum": num(min), "maximum": num(max)})
}

fn single_key_object(key: &str, payload: Value) -> Value {
    json!({"type": "object", "properties": {key: payload}, "required": [key],
           "additionalProperties": false})
}
