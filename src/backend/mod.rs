//! Where commands run: implementations of the job core's [`crate::job::Backend`] trait.
//!
//! - [`local`]: processes on this host, one process group per job (the embedded default).
//! - [`daytona`]: process sessions in Daytona sandboxes.

pub mod daytona;
pub mod local;
