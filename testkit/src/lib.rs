//! Real backing servers for tests and benchmarks of cluster mode: a
//! throwaway PostgreSQL cluster ([`postgres`]) and an S3-compatible server
//! ([`s3`]), each on a loopback port, stopped when dropped. Not mocks: the
//! same servers a deployment talks to.

pub mod postgres;
pub mod s3;
pub mod tls;
