//! neurostream: Kafka-native stream processing with online clustering and event-time windows.
//!
//! # Layout
//! - [`config`]: typed configuration (figment layers, profiles, validation, provenance);
//!   [`config::security`] (Kafka TLS/SASL, PostgreSQL TLS, secrets and their files),
//!   [`config::formats`] (input and output formats, the Schema Registry settings).
//! - [`event`]: the input event shape and its decoding, with a reason for every rejection.
//! - [`avro`]: Avro input (Confluent wire format, plain datums) resolved against the product's
//!   reader schema, the Schema Registry client and cache ([`avro::registry`]), Avro outputs
//!   ([`avro::output`]).
//! - [`output`]: output message shapes, their topics and keys.
//! - [`windows`]: event-time windows: tumbling, hopping ([`windows::fixed`]) and sliding
//!   ([`windows::sliding`]); pure, checkpointable.
//! - [`ncs`]: online clustering: [`ncs::corrected`] (`ncs`, the default), [`ncs::v8`] (the NCS
//!   V8 reference port), [`ncs::drift`] (Page-Hinkley and ADWIN change detectors).
//! - [`processor`]: the pure per-partition processor every entry point drives.
//! - [`clustering`]: the processor's clustering stage: engine decisions to outputs.
//! - [`offline`]: `neurostream process`, the processor over JSON lines.
//! - [`kafka`]: the Kafka edge: consumer group and rebalances ([`kafka::intake`]), the
//!   idempotent output producer with failure classes ([`kafka::producer`]), rate-limited client
//!   logs ([`kafka::client_log`]), topic checks and creation at start-up.
//! - [`worker`]: one task per assigned partition: batches, flushes, checkpoints.
//! - [`offsets`]: all offset handling (start at checkpoints, store exactly the next offset only
//!   after it is durable, drop re-deliveries, report gaps).
//! - [`store`]: PostgreSQL sink (COPY → upsert + checkpoint in one fenced transaction, refused
//!   rows named) and the in-memory fallback.
//! - `pgcopy`: PostgreSQL's binary COPY format, the sink's encoding.
//! - [`pgserver`]: a private PostgreSQL server for the demo and tests.
//! - [`app`]: the service: wires everything and runs until shutdown.
//! - [`http`]: `/metrics`, `/health`, `/ready`, `/status`.
//! - [`telemetry`]: metric names, shared progress counters, logging.
//! - [`generator`]: synthetic clustered events (demo, `produce`, benches).
//! - [`demo`]: `neurostream demo`, the whole pipeline on one machine.
//! - [`tools`]: `neurostream produce` and `neurostream tail`.

pub mod app;
pub mod avro;
pub mod clustering;
pub mod config;
pub mod demo;
pub mod event;
pub mod generator;
pub mod http;
pub mod kafka;
pub mod ncs;
pub mod offline;
pub mod offsets;
pub mod output;
mod pgcopy;
pub mod pgserver;
pub mod processor;
pub mod store;
pub mod telemetry;
pub mod tools;
pub mod windows;
pub mod worker;
