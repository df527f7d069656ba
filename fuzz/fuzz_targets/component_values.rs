//! WIT → tool schema → JSON ⇄ component values, on components with
//! arbitrary signatures. For every tool of a generated component: its
//! parameter and result schemas compile; a value of each parameter's type
//! goes to JSON that the schema accepts and comes back equal; any JSON
//! the arguments reader accepts, the schema accepts too (the schema an LLM
//! is given never promises less than the host takes); nothing panics.
#![no_main]

use airlock_fuzz::{component, val, wit};
use airlock_wasm_tools::ToolSet;
use airlock_wasm_tools::value::{args_to_vals, val_to_json};
use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use std::sync::OnceLock;

fn engine() -> &'static wasmtime::Engine {
    static E: OnceLock<wasmtime::Engine> = OnceLock::new();
    E.get_or_init(|| {
        // The generated functions only trap: compile them as fast as
        // possible, one thread (libFuzzer is one process per core).
        let mut c = wasmtime::Config::new();
        c.cranelift_opt_level(wasmtime::OptLevel::None);
        wasmtime::Engine::new(&c).expect("engine")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(text) = wit(&mut u) else {
        return;
    };
    let bytes = component(&text);
    let (_, set) = ToolSet::from_bytes(engine(), &bytes)
        .unwrap_or_else(|e| panic!("a generated component is refused: {e}\n{text}"));
    for tool in &set.tools {
        let params = jsonschema::validator_for(&tool.parameters).unwrap_or_else(|e| {
            panic!("{}: the parameter schema does not compile: {e}", tool.name)
        });
        let result = jsonschema::validator_for(&tool.result)
            .unwrap_or_else(|e| panic!("{}: the result schema does not compile: {e}", tool.name));

        // A value of every parameter, as JSON and back.
        let vals: Result<Vec<_>, _> = tool
            .param_types
            .iter()
            .map(|(_, t)| val(t, &mut u, 0))
            .collect();
        let Ok(vals) = vals else {
            return;
        };
        let mut args = Map::new();
        for ((name, _), v) in tool.param_types.iter().zip(&vals) {
            let j = val_to_json(v, name).unwrap_or_else(|e| panic!("{v:?} has no JSON: {e}"));
            args.insert(name.clone(), j);
        }
        let args = Value::Object(args);
        assert!(
            params.is_valid(&args),
            "{}: the schema refuses {args}\n{text}",
            tool.name
        );
        let back = args_to_vals(&tool.param_types, &args)
            .unwrap_or_else(|e| panic!("{}: {args} does not read back: {e}\n{text}", tool.name));
        assert_eq!(format!("{back:?}"), format!("{vals:?}"), "{args}");

        // A result value against the result schema.
        if let Some(t) = &tool.result_type
            && let Ok(v) = val(t, &mut u, 0)
        {
            let j = val_to_json(&v, "result").unwrap_or_else(|e| panic!("{v:?} has no JSON: {e}"));
            assert!(
                result.is_valid(&j),
                "{}: the result schema refuses {j}\n{text}",
                tool.name
            );
        }

        // Whatever JSON the reader takes, the schema takes.
        let junk = u.bytes(u.len().min(512)).unwrap_or_default();
        if let Ok(j) = serde_json::from_slice::<Value>(junk)
            && args_to_vals(&tool.param_types, &j).is_ok()
        {
            assert!(
                params.is_valid(&j),
                "{}: taken but not in the schema: {j}\n{text}",
                tool.name
            );
        }
    }
});
