//! Online clustering of feature vectors: the NCS family.
//!
//! - [`v8`]: `ncs-v8`, a faithful port of the NCS V8 reference, defects included.
//! - [`corrected`]: `ncs`, the default: the same idea with the reference's defects fixed.
//! - [`drift`]: global change detectors (Page-Hinkley, ADWIN).

pub mod corrected;
pub mod drift;
pub mod v8;
