use super::*;

fn component() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/out/kitchen.wasm"
    ))
    .expect("cargo xtask examples")
}

#[test]
fn a_signed_component_verifies_with_its_key_only() {
    let (a, b) = (SigningKey::generate(), SigningKey::generate());
    let signed = a.sign_component(&component()).unwrap();
    // Still a component wasmparser reads, header kept.
    assert_eq!(signed[..8], component()[..8]);
    assert_eq!(
        check_component(&signed, &[b.public(), a.public()]).unwrap(),
        Signed::By(a.public().id())
    );
    let e = check_component(&signed, &[b.public()]).unwrap_err();
    assert!(e.to_string().contains("no key this tenant trusts"), "{e}");
    assert!(check_component(&signed, &[]).is_err());
    assert_eq!(
        check_component(&component(), &[a.public()]).unwrap(),
        Signed::Unsigned
    );
}

#[test]
fn a_changed_byte_after_signing_fails() {
    let a = SigningKey::generate();
    let mut signed = a.sign_component(&component()).unwrap();
    let n = signed.len();
    signed[n - 10] ^= 1;
    assert!(check_component(&signed, &[a.public()]).is_err());
}

#[test]
fn a_signature_section_that_is_not_first_or_lies_about_lengths_is_refused() {
    let a = SigningKey::generate();
    let signed = a.sign_component(&component()).unwrap();
    // Move the signature section to the end: not silently "unsigned".
    let mut sections = wasmparser::Parser::new(0).parse_all(&signed);
    let first = loop {
        if let Some(Ok(wasmparser::Payload::CustomSection(c))) = sections.next() {
            break c.range();
        }
    };
    // The section's id and size bytes come before its payload range.
    let header_len = 1 + leb_len(first.end - first.start);
    let start = first.start - header_len;
    let mut moved = signed[..start].to_vec();
    moved.extend_from_slice(&signed[first.end..]);
    moved.extend_from_slice(&signed[start..first.end]);
    let e = check_component(&moved, &[a.public()]).unwrap_err();
    assert!(e.to_string().contains("must come first"), "{e}");

    // Lengths inside the section: a key id claiming 4 GiB is refused before
    // any parser allocates it.
    let mut data = vec![1u8, 1, 1, 1]; // version, content type, hash, 1 set
    let mut set = vec![0u8, 1]; // no hashes, one signature
    set.extend_from_slice(&[5, 0xf0, 0xff, 0xff, 0xff, 0x0f]); // a 5-byte slice...
    data.push(set.len() as u8);
    data.extend_from_slice(&set);
    let e = check_signature_section(&data).unwrap_err();
    assert!(e.contains("does not fit"), "{e}");
    assert!(
        check_signature_section(&[1, 1, 1, 65])
            .unwrap_err()
            .contains("more than 64")
    );
    assert!(check_signature_section(&vec![0; MAX_SECTION_BYTES + 1]).is_err());
}

fn leb_len(mut v: usize) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

#[test]
fn a_policy_signature_binds_tenant_component_and_text() {
    let (a, b) = (SigningKey::generate(), SigningKey::generate());
    let text = "version = 1\n";
    let sig = a.sign_policy("acme", "fetch", text);
    let trusted = [a.public()];
    assert_eq!(
        check_policy(Some(&sig), "acme", "fetch", text, &trusted).unwrap(),
        Signed::By(a.public().id())
    );
    for (tenant, comp, t) in [
        ("acme", "escape", text),
        ("other", "fetch", text),
        (
            "acme",
            "fetch",
            "version = 1\n[http]\nallow = [\"https://x\"]\n",
        ),
    ] {
        assert!(check_policy(Some(&sig), tenant, comp, t, &trusted).is_err());
    }
    assert!(check_policy(Some(&sig), "acme", "fetch", text, &[b.public()]).is_err());
    assert_eq!(
        check_policy(None, "acme", "fetch", text, &trusted).unwrap(),
        Signed::Unsigned
    );
    for bad in ["", "ed25519:zz", "ed25519:00", "rsa:00"] {
        let e = check_policy(Some(bad), "acme", "fetch", text, &trusted).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("The policy's signature is not valid"),
            "{e}"
        );
    }
}

#[test]
fn keys_parse_from_text_and_files_and_bad_ones_are_named() {
    let a = SigningKey::generate();
    let id = a.public().id();
    assert_eq!(TrustedKey::parse(&id).unwrap(), a.public());
    let dir = tempfile::tempdir().unwrap();
    let sk = dir.path().join("k.sec");
    std::fs::write(&sk, a.to_bytes()).unwrap();
    assert_eq!(SigningKey::from_file(&sk).unwrap().public(), a.public());
    let pk = dir.path().join("k.pem");
    std::fs::write(&pk, a.sk.sk.public_key().to_pem()).unwrap();
    assert_eq!(TrustedKey::parse(pk.to_str().unwrap()).unwrap(), a.public());
    for bad in [
        "ed25519:abcd",
        "ed25519:xyz",
        "relative/key.pub",
        "/nonexistent/key",
    ] {
        let e = TrustedKey::parse(bad).unwrap_err();
        assert!(e.to_string().contains(bad), "{e}");
    }
    std::fs::write(&sk, b"not a key").unwrap();
    assert!(SigningKey::from_file(&sk).is_err());
}
