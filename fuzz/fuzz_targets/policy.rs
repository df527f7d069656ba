//! The policy parser on any text a tenant admin uploads: never a panic;
//! a policy that parses gives its grant set.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = airlock::policy::parse(text, std::path::Path::new("/srv/airlock")) {
        let _ = p.grant_set();
        let _ = p.over_ceiling(&airlock_guest::Limits::default());
    }
});
