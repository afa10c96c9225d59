//! election-agent: a leader-election service for distributed systems.
//!
//! Applications campaign for, keep, hand over and watch leadership over gRPC or HTTP; leases live
//! in a lease store. The crate is layered from the inside out:
//!
//! * [`lease`] — the lease engine: the rules of leadership as pure functions;
//! * [`store`] — lease stores, which apply those rules atomically and announce changes;
//! * [`election`] — the service every adapter calls: validation, metrics, Observe streams;
//! * [`discovery`] — Kubernetes watch caches behind `GetPods`;
//! * [`auth`] — who may call the API: bearer tokens, the authorization policy;
//! * [`grpc`], [`http`] — thin adapters for the wire protocols;
//! * [`config`], [`metrics`], [`server`] — configuration, Prometheus metrics, process wiring;
//! * [`transport`] — connections of both ports: caps, timeouts, stream limits;
//! * [`client`], [`bench`] — the command-line gRPC client and the load generator.
// No unsafe code, except one audited call into the C allocator (`server::trim_heap`).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod bench;
pub mod client;
pub mod config;
pub mod discovery;
pub mod election;
pub mod grpc;
pub mod http;
pub mod lease;
pub mod metrics;
pub mod operator;
pub mod server;
pub mod store;
pub mod transport;
