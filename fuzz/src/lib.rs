//! Helpers shared by the fuzz targets: components with arbitrary WIT
//! signatures (a random type tree, written as WIT, made into a component
//! by `wit-component`), and values of a component type drawn from fuzz
//! input.

use arbitrary::{Result, Unstructured};
use wasmtime::component::{Type, Val};

/// The most types, parameters and functions one generated world has.
const MAX_DEFS: usize = 6;
const MAX_FUNCS: usize = 3;
const MAX_PARAMS: usize = 4;
const MAX_DEPTH: u32 = 3;

const PRIMS: [&str; 13] = [
    "bool", "u8", "s8", "u16", "s16", "u32", "s32", "u64", "s64", "f32", "f64", "char", "string",
];

/// A WIT type expression over `defs` named types `d0..d{defs}`.
fn ty(u: &mut Unstructured<'_>, defs: usize, depth: u32) -> Result<String> {
    let leaf = depth >= MAX_DEPTH;
    let kind = if leaf { 0 } else { u.int_in_range(0..=6)? };
    Ok(match kind {
        1 => format!("list<{}>", ty(u, defs, depth + 1)?),
        2 => format!("option<{}>", ty(u, defs, depth + 1)?),
        3 => {
            let ok = if u.arbitrary()? {
                Some(ty(u, defs, depth + 1)?)
            } else {
                None
            };
            let err = if u.arbitrary()? {
                Some(ty(u, defs, depth + 1)?)
            } else {
                None
            };
            match (ok, err) {
                (Some(o), Some(e)) => format!("result<{o}, {e}>"),
                (Some(o), None) => format!("result<{o}>"),
                (None, Some(e)) => format!("result<_, {e}>"),
                (None, None) => "result".into(),
            }
        }
        4 => {
            let n = u.int_in_range(1..=3)?;
            let parts: Result<Vec<String>> = (0..n).map(|_| ty(u, defs, depth + 1)).collect();
            format!("tuple<{}>", parts?.join(", "))
        }
        5 if defs > 0 => format!("d{}", u.choose_index(defs)?),
        _ => (*u.choose(&PRIMS)?).to_string(),
    })
}

/// A WIT package with an interface of random named types and functions,
/// and its world exporting it; `None` when the input ran out.
pub fn wit(u: &mut Unstructured<'_>) -> Result<String> {
    let mut out = String::from("package fuzz:gen;\n\ninterface api {\n");
    let defs = u.int_in_range(0..=MAX_DEFS)?;
    for i in 0..defs {
        // Each definition may only use the ones before it (no recursion).
        match u.int_in_range(0..=3)? {
            0 => {
                let n = u.int_in_range(1..=4)?;
                out.push_str(&format!("  record d{i} {{\n"));
                for f in 0..n {
                    out.push_str(&format!("    f{f}: {},\n", ty(u, i, 1)?));
                }
                out.push_str("  }\n");
            }
            1 => {
                let n = u.int_in_range(1..=4)?;
                out.push_str(&format!("  variant d{i} {{\n"));
                for c in 0..n {
                    if u.arbitrary()? {
                        out.push_str(&format!("    c{c}({}),\n", ty(u, i, 1)?));
                    } else {
                        out.push_str(&format!("    c{c},\n"));
                    }
                }
                out.push_str("  }\n");
            }
            2 => {
                let n = u.int_in_range(1..=4)?;
                let cases: Vec<String> = (0..n).map(|c| format!("e{c}")).collect();
                out.push_str(&format!("  enum d{i} {{ {} }}\n", cases.join(", ")));
            }
            _ => {
                let n = u.int_in_range(1..=4)?;
                let flags: Vec<String> = (0..n).map(|c| format!("g{c}")).collect();
                out.push_str(&format!("  flags d{i} {{ {} }}\n", flags.join(", ")));
            }
        }
    }
    let funcs = u.int_in_range(1..=MAX_FUNCS)?;
    for f in 0..funcs {
        let n = u.int_in_range(0..=MAX_PARAMS)?;
        let params: Result<Vec<String>> = (0..n)
            .map(|p| Ok(format!("a{p}: {}", ty(u, defs, 0)?)))
            .collect();
        let result = if u.arbitrary()? {
            format!(" -> {}", ty(u, defs, 0)?)
        } else {
            String::new()
        };
        out.push_str(&format!(
            "  run{f}: func({}){result};\n",
            params?.join(", ")
        ));
    }
    out.push_str("}\n\nworld w {\n  export api;\n}\n");
    Ok(out)
}

/// The component (a module that traps in every function, wrapped with
/// the world's types) for WIT text from [`wit`].
///
/// # Panics
/// When generated WIT does not make a component: a bug of the generator.
pub fn component(wit_text: &str) -> Vec<u8> {
    let mut resolve = wit_parser::Resolve::default();
    let pkg = resolve
        .push_str("gen.wit", wit_text)
        .unwrap_or_else(|e| panic!("generated WIT does not parse: {e:#}\n{wit_text}"));
    let world = resolve.select_world(&[pkg], Some("w")).expect("world w");
    let mut module = wit_component::dummy_module(
        &resolve,
        world,
        wit_parser::ManglingAndAbi::Legacy(wit_parser::LiftLowerAbi::Sync),
    );
    wit_component::embed_component_metadata(
        &mut module,
        &resolve,
        world,
        wit_component::StringEncoding::UTF8,
    )
    .expect("metadata embeds");
    wit_component::ComponentEncoder::default()
        .module(&module)
        .expect("module")
        .validate(true)
        .encode()
        .unwrap_or_else(|e| panic!("generated WIT does not encode: {e:#}\n{wit_text}"))
}

/// A value of `ty` drawn from `u`.
///
/// # Errors
/// The input ran out.
pub fn val(ty: &Type, u: &mut Unstructured<'_>, depth: u32) -> Result<Val> {
    let small = |u: &mut Unstructured<'_>| -> Result<usize> {
        if depth > 4 {
            Ok(0)
        } else {
            u.int_in_range(0..=3)
        }
    };
    Ok(match ty {
        Type::Bool => Val::Bool(u.arbitrary()?),
        Type::S8 => Val::S8(u.arbitrary()?),
        Type::U8 => Val::U8(u.arbitrary()?),
        Type::S16 => Val::S16(u.arbitrary()?),
        Type::U16 => Val::U16(u.arbitrary()?),
        Type::S32 => Val::S32(u.arbitrary()?),
        Type::U32 => Val::U32(u.arbitrary()?),
        Type::S64 => Val::S64(u.arbitrary()?),
        Type::U64 => Val::U64(u.arbitrary()?),
        Type::Float32 => Val::Float32(u.arbitrary()?),
        Type::Float64 => Val::Float64(u.arbitrary()?),
        Type::Char => Val::Char(u.arbitrary()?),
        Type::String => Val::String(u.arbitrary()?),
        Type::List(l) => {
            let n = small(u)?;
            Val::List(
                (0..n)
                    .map(|_| val(&l.ty(), u, depth + 1))
                    .collect::<Result<_>>()?,
            )
        }
        Type::Record(r) => Val::Record(
            r.fields()
                .map(|f| Ok((f.name.to_string(), val(&f.ty, u, depth + 1)?)))
                .collect::<Result<_>>()?,
        ),
        Type::Tuple(t) => Val::Tuple(
            t.types()
                .map(|t| val(&t, u, depth + 1))
                .collect::<Result<_>>()?,
        ),
        Type::Variant(v) => {
            let cases: Vec<_> = v.cases().collect();
            let c = &cases[u.choose_index(cases.len())?];
            let payload = match &c.ty {
                Some(t) => Some(Box::new(val(t, u, depth + 1)?)),
                None => None,
            };
            Val::Variant(c.name.to_string(), payload)
        }
        Type::Enum(e) => {
            let names: Vec<&str> = e.names().collect();
            Val::Enum(names[u.choose_index(names.len())?].to_string())
        }
        Type::Option(o) => Val::Option(if u.arbitrary()? {
            Some(Box::new(val(&o.ty(), u, depth + 1)?))
        } else {
            None
        }),
        Type::Result(r) => {
            let side = |t: Option<Type>, u: &mut Unstructured<'_>| -> Result<Option<Box<Val>>> {
                t.map(|t| val(&t, u, depth + 1).map(Box::new)).transpose()
            };
            Val::Result(if u.arbitrary()? {
                Ok(side(r.ok(), u)?)
            } else {
                Err(side(r.err(), u)?)
            })
        }
        Type::Flags(f) => Val::Flags(
            f.names()
                .filter_map(|n| match u.arbitrary::<bool>() {
                    Ok(true) => Some(Ok(n.to_string())),
                    Ok(false) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<_>>()?,
        ),
        // The generator makes no resources, maps, futures or streams.
        _ => return Err(arbitrary::Error::IncorrectFormat),
    })
}
