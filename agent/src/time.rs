//! Waiting on deadlines that may not be set.

/// Sleeps until `deadline`, or forever without one: a `select!` arm for a
/// timer that is not always running.
pub async fn sleep_until(deadline: Option<impl Into<tokio::time::Instant>>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}
