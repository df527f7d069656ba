//! A private certificate authority for tests of verified TLS: a CA and a
//! leaf it signed for loopback names, both fresh per call.

use rcgen::{BasicConstraints, Certificate, CertificateParams, IsCa, Issuer, KeyPair};

/// A CA and one leaf certificate it issued.
pub struct TestPki {
    /// The CA's certificate (what a client trusts).
    pub ca: Certificate,
    /// The leaf's certificate (what a server presents).
    pub leaf: Certificate,
    /// The leaf's key.
    pub leaf_key: KeyPair,
}

/// A fresh CA and a leaf it signed for `names` (DNS names or IP addresses).
///
/// # Panics
/// Key generation or signing failed (a test cannot go on).
pub fn ca_and_leaf(names: &[&str]) -> TestPki {
    let ca_key = KeyPair::generate().expect("a CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("a self-signed CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().expect("a leaf key");
    let leaf = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .expect("leaf parameters")
        .signed_by(&leaf_key, &issuer)
        .expect("a signed leaf");
    TestPki { ca, leaf, leaf_key }
}
