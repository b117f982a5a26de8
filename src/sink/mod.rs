//! Where copies of job events go: implementations of the job core's [`crate::job::Sink`] trait.
//!
//! - [`convex`]: the mirror into the Convex `/daytona-ingest` endpoint.

pub mod convex;
