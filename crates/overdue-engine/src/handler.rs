//! Handlers: what runs when a timer fires.

use std::future::Future;

use futures::future::BoxFuture;
use overdue_core::{Firing, Outcome};

/// An async function from a [`Firing`] to an [`Outcome`]. Implemented for every
/// `Fn(Firing) -> impl Future<Output = Outcome>` closure.
///
/// Handlers must be idempotent: after a crash or a lost settlement the same generation may be
/// delivered again, and the effect must still happen once (a conditional update, an insert under
/// a unique constraint).
pub trait Handler: Send + Sync + 'static {
    /// Runs the effect of one firing.
    fn call(&self, firing: Firing) -> BoxFuture<'static, Outcome>;
}

impl<F, Fut> Handler for F
where
    F: Fn(Firing) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    fn call(&self, firing: Firing) -> BoxFuture<'static, Outcome> {
        Box::pin(self(firing))
    }
}
