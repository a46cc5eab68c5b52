//! Online clustering of feature vectors: the NCS family.
//!
//! - [`v8`]: `ncs-v8`, a faithful port of the NCS V8 reference, defects included.
//! - [`drift`]: global change detectors (Page-Hinkley, ADWIN).

pub mod drift;
pub mod v8;
