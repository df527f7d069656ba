//! A component as a set of tools.
//!
//! Every exported function (top-level, or inside an exported interface) whose
//! parameter and result types have a JSON form becomes a [`Tool`]. Functions
//! that take or return resources, futures or streams are listed in
//! [`ToolSet::skipped`] with the reason.
//!
//! **Naming invariant:** tool names match `^[a-zA-Z0-9_-]{1,64}$` and depend
//! only on the component's export names, so they are stable across builds.

use crate::capability::{CapabilityClass, ImportInfo};
use crate::docs::Docs;
use crate::schema::type_schema;
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use wasmtime::Engine;
use wasmtime::component::Component;
use wasmtime::component::types::{ComponentFunc, ComponentItem, Type};

/// The longest tool name LLM vendors accept.
pub const MAX_TOOL_NAME: usize = 64;

/// Errors while reading a component as a tool set.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    /// The bytes are not a valid component for this engine.
    #[error("The component is invalid: {0}.")]
    InvalidComponent(String),
    /// The component exports nothing that can be a tool.
    #[error("The component exports no function that can be used as a tool.")]
    NoTools,
}

/// One callable tool.
#[derive(Debug, Clone, Serialize)]
pub struct Tool {
    /// LLM-safe name, unique in the set.
    pub name: String,
    /// The exported instance (interface) the function lives in, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// The function's own name inside the export.
    pub function: String,
    /// Doc comment from the WIT, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema of the arguments object.
    pub parameters: Value,
    /// JSON Schema of the result (`null` schema when the function returns nothing).
    pub result: Value,
    /// Parameter names and types, in call order.
    #[serde(skip)]
    pub param_types: Vec<(String, Type)>,
    /// The result type, if the function returns one.
    #[serde(skip)]
    pub result_type: Option<Type>,
}

/// An export that is not offered as a tool.
#[derive(Debug, Clone, Serialize)]
pub struct SkippedExport {
    /// `func` or `interface#func`.
    pub export: String,
    /// Why it is not a tool.
    pub reason: String,
}

/// Everything the contract knows about one component.
#[derive(Debug, Clone, Serialize)]
pub struct ToolSet {
    /// The tools, sorted by name.
    pub tools: Vec<Tool>,
    /// Exports that are not tools.
    pub skipped: Vec<SkippedExport>,
    /// The component's imports and their capability classes.
    pub imports: Vec<ImportInfo>,
}

impl ToolSet {
    /// Read the tool set of a compiled component.
    ///
    /// `docs` supplies descriptions (see [`crate::docs`]); pass
    /// `Docs::default()` when there are none.
    pub fn from_component(engine: &Engine, component: &Component, docs: &Docs) -> Self {
        let ty = component.component_type();
        let mut raw: Vec<RawTool> = Vec::new();
        let mut skipped = Vec::new();

        for (name, ext) in ty.exports(engine) {
            match ext.ty {
                ComponentItem::ComponentFunc(f) => {
                    consider(None, name, &f, docs, &mut raw, &mut skipped);
                }
                ComponentItem::ComponentInstance(inst) => {
                    for (fname, fext) in inst.exports(engine) {
                        if let ComponentItem::ComponentFunc(f) = fext.ty {
                            consider(Some(name), fname, &f, docs, &mut raw, &mut skipped);
                        }
                    }
                }
                _ => {}
            }
        }

        let names = assign_names(&raw);
        let mut tools: Vec<Tool> = raw
            .into_iter()
            .zip(names)
            .map(|(r, name)| Tool {
                name,
                interface: r.interface,
                function: r.function,
                description: r.description,
                parameters: r.parameters,
                result: r.result,
                param_types: r.param_types,
                result_type: r.result_type,
            })
            .collect();
        tools.sort_by(|a, b| a.name.cmp(&b.name));

        let mut imports: Vec<ImportInfo> = ty
            .imports(engine)
            .map(|(name, _)| ImportInfo {
                name: name.to_string(),
                class: CapabilityClass::of_import(name),
            })
            .collect();
        imports.sort_by(|a, b| a.name.cmp(&b.name));

        ToolSet {
            tools,
            skipped,
            imports,
        }
    }

    /// Compile `bytes` with `engine` and read the tool set, taking docs from the
    /// embedded WIT.
    #[cfg(feature = "compile")]
    ///
    /// # Errors
    /// [`ContractError::InvalidComponent`] for bytes that are not a component.
    pub fn from_bytes(engine: &Engine, bytes: &[u8]) -> Result<(Component, Self), ContractError> {
        let component = compile(engine, bytes)?;
        let docs = crate::docs::from_component(bytes);
        let set = Self::from_component(engine, &component, &docs);
        Ok((component, set))
    }

    /// Find a tool by name.
    pub fn tool(&self, name: &str) -> Option<&Tool> {
        self.tools.iter().find(|t| t.name == name)
    }

    /// The set of capability classes the component imports.
    pub fn capability_classes(&self) -> Vec<CapabilityClass> {
        let mut v: Vec<CapabilityClass> = self.imports.iter().map(|i| i.class).collect();
        v.sort();
        v.dedup();
        v
    }

    /// What `airlock inspect --json` prints and the service's component
    /// answer carries: `tools`, `skipped`, `imports`, `capabilities`.
    pub fn inspect_json(&self) -> serde_json::Value {
        serde_json::json!({
            "tools": self.tools,
            "skipped": self.skipped,
            "imports": self.imports,
            "capabilities": self.capability_classes(),
        })
    }
}

/// Compile a component, turning wasmtime's error into a readable sentence.
#[cfg(feature = "compile")]
///
/// # Errors
/// [`ContractError::InvalidComponent`] for anything that is not a valid component.
pub fn compile(engine: &Engine, bytes: &[u8]) -> Result<Component, ContractError> {
    check_is_component(bytes)?;
    Component::from_binary(engine, bytes)
        .map_err(|e| ContractError::InvalidComponent(format!("{e:#}")))
}

/// Cheap structural check before handing bytes to the compiler, so the error
/// says what is wrong in plain words.
#[cfg(feature = "compile")]
fn check_is_component(bytes: &[u8]) -> Result<(), ContractError> {
    if bytes.len() < 8 {
        return Err(ContractError::InvalidComponent(format!(
            "{} byte(s) is too short to be a WebAssembly binary",
            bytes.len()
        )));
    }
    if &bytes[0..4] != b"\0asm" {
        return Err(ContractError::InvalidComponent(
            "missing the WebAssembly magic number \\0asm".into(),
        ));
    }
    if wasmparser::Parser::is_core_wasm(bytes) {
        return Err(ContractError::InvalidComponent(
            "this is a core WebAssembly module, not a component (build for wasm32-wasip2 or run `wasm-tools component new`)".into(),
        ));
    }
    Ok(())
}

struct RawTool {
    interface: Option<String>,
    function: String,
    description: Option<String>,
    parameters: Value,
    result: Value,
    param_types: Vec<(String, Type)>,
    result_type: Option<Type>,
}

fn consider(
    interface: Option<&str>,
    fname: &str,
    f: &ComponentFunc,
    docs: &Docs,
    raw: &mut Vec<RawTool>,
    skipped: &mut Vec<SkippedExport>,
) {
    let export = match interface {
        Some(i) => format!("{i}#{fname}"),
        None => fname.to_string(),
    };
    let skip = |reason: String, skipped: &mut Vec<SkippedExport>| {
        skipped.push(SkippedExport {
            export: export.clone(),
            reason,
        })
    };
    if fname.starts_with('[') {
        skip(
            "resource constructors and methods are not tools".into(),
            skipped,
        );
        return;
    }
    if f.async_() {
        skip(
            "async-lifted functions are not supported yet".into(),
            skipped,
        );
        return;
    }
    let mut props = serde_json::Map::new();
    let mut required = Vec::new();
    let mut param_types = Vec::new();
    for (pname, pty) in f.params() {
        let Some(s) = type_schema(&pty) else {
            skip(
                format!("parameter `{pname}` has a type with no JSON form"),
                skipped,
            );
            return;
        };
        props.insert(pname.to_string(), s);
        if !matches!(pty, Type::Option(_)) {
            required.push(Value::String(pname.to_string()));
        }
        param_types.push((pname.to_string(), pty));
    }
    let results: Vec<Type> = f.results().collect();
    if results.len() > 1 {
        skip(
            "functions with more than one result are not supported".into(),
            skipped,
        );
        return;
    }
    let result_type = results.into_iter().next();
    let result = match &result_type {
        Some(t) => match type_schema(t) {
            Some(s) => s,
            None => {
                skip("the result type has no JSON form".into(), skipped);
                return;
            }
        },
        None => json!({"type": "null"}),
    };
    raw.push(RawTool {
        interface: interface.map(str::to_string),
        function: fname.to_string(),
        description: docs.functions.get(&export).map(|d| d.trim().to_string()),
        parameters: json!({
            "type": "object",
            "properties": props,
            "required": required,
            "additionalProperties": false,
        }),
        result,
        param_types,
        result_type,
    });
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn short_hash(s: &str) -> String {
    hex::encode(&Sha256::digest(s.as_bytes())[..4])
}

fn fit(name: String, full: &str) -> String {
    if name.len() <= MAX_TOOL_NAME {
        name
    } else {
        format!("{}_{}", &name[..MAX_TOOL_NAME - 9], short_hash(full))
    }
}

/// Assign unique, LLM-safe names.
///
/// Short form: `func` for top-level functions, `iface_func` for interface
/// functions (`iface` without package and version). Names that collide fall
/// back to the long form `ns_pkg_iface_func`, then to a hash suffix.
fn assign_names(raw: &[RawTool]) -> Vec<String> {
    let full = |r: &RawTool| match &r.interface {
        Some(i) => format!("{i}#{}", r.function),
        None => r.function.clone(),
    };
    let short = |r: &RawTool| match &r.interface {
        Some(i) => {
            let iface = i.split_once('/').map(|(_, x)| x).unwrap_or(i);
            let iface = iface.split('@').next().unwrap_or(iface);
            fit(sanitize(&format!("{iface}_{}", r.function)), &full(r))
        }
        None => fit(sanitize(&r.function), &full(r)),
    };
    let long = |r: &RawTool| match &r.interface {
        Some(i) => {
            let no_ver = i.split('@').next().unwrap_or(i);
            fit(sanitize(&format!("{no_ver}_{}", r.function)), &full(r))
        }
        None => fit(sanitize(&r.function), &full(r)),
    };
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for r in raw {
        *counts.entry(short(r)).or_default() += 1;
    }
    let mut names: Vec<String> = raw
        .iter()
        .map(|r| {
            if counts[&short(r)] > 1 {
                long(r)
            } else {
                short(r)
            }
        })
        .collect();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for n in &names {
        *counts.entry(n.clone()).or_default() += 1;
    }
    for (n, r) in names.iter_mut().zip(raw) {
        if counts[n.as_str()] > 1 {
            let base: String = n.chars().take(MAX_TOOL_NAME - 9).collect();
            *n = format!("{base}_{}", short_hash(&full(r)));
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(interface: Option<&str>, function: &str) -> RawTool {
        RawTool {
            interface: interface.map(str::to_string),
            function: function.into(),
            description: None,
            parameters: Value::Null,
            result: Value::Null,
            param_types: vec![],
            result_type: None,
        }
    }

    fn valid(n: &str) -> bool {
        !n.is_empty()
            && n.len() <= 64
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    }

    #[test]
    fn names_are_short_unique_and_valid() {
        let set = vec![
            raw(None, "greet"),
            raw(Some("acme:files/fs@1.0.0"), "read-file"),
            raw(Some("acme:a/util"), "run"),
            raw(Some("acme:b/util"), "run"),
            raw(None, &"x".repeat(100)),
        ];
        let names = assign_names(&set);
        assert_eq!(names[0], "greet");
        assert_eq!(names[1], "fs_read-file");
        assert_eq!(names[2], "acme_a_util_run");
        assert_eq!(names[3], "acme_b_util_run");
        assert!(names.iter().all(|n| valid(n)), "{names:?}");
        let mut d = names.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), names.len());
        // Deterministic.
        assert_eq!(assign_names(&set), names);
    }

    #[test]
    fn rejects_non_components() {
        let engine = Engine::default();
        assert!(
            matches!(compile(&engine, b""), Err(ContractError::InvalidComponent(m)) if m.contains("too short"))
        );
        assert!(
            matches!(compile(&engine, b"hello world!"), Err(ContractError::InvalidComponent(m)) if m.contains("magic"))
        );
        let core = b"\0asm\x01\0\0\0";
        assert!(
            matches!(compile(&engine, core), Err(ContractError::InvalidComponent(m)) if m.contains("core WebAssembly module"))
        );
        let truncated = b"\0asm\x0d\0\x01\0\x01\x05";
        assert!(matches!(
            compile(&engine, truncated),
            Err(ContractError::InvalidComponent(_))
        ));
    }
}
