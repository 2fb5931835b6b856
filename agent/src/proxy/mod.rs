//! The data plane in user space. `outbound` serves what the kernel programs
//! capture inside a pod; HBONE's `inbound` side joins it in the next step.

pub mod outbound;
